"""Metrics: paired image metrics (PSNR, SSIM, LPIPS), FID / KID, distances between sample sets and
exact laws, and the weight files the metric networks need.

* :mod:`hessdiff.eval.metrics.paired` -- PSNR, SSIM, LPIPS and :class:`MetricSuite`;
* :mod:`hessdiff.eval.metrics.fid` -- feature statistics, Fréchet distance, FID and KID;
* :mod:`hessdiff.eval.metrics.distances` -- sliced W1, Gaussian W2, mixture component TV;
* :mod:`hessdiff.eval.metrics.weights` -- locating / fetching metric weights (:class:`MissingWeightsError`).

Heavy libraries (lpips, clean-fid, torchvision, PIL) are imported only when used.
"""

from hessdiff.eval.metrics.distances import (
    component_tv,
    gaussian_w2,
    posterior_mean_error,
    random_directions,
    sliced_wasserstein,
    wasserstein1_1d,
)
from hessdiff.eval.metrics.fid import (
    INCEPTION_FILENAME,
    INCEPTION_URL,
    CleanFIDInception,
    DistributionMetrics,
    FeatureExtractor,
    FeatureStats,
    NamedExtractor,
    extractor_name,
    fid_from_stats,
    folder_feature_stats,
    frechet_distance,
    inception_weights_path,
    kernel_inception_distance,
)
from hessdiff.eval.metrics.paired import (
    LPIPS,
    LPIPS_BACKBONES,
    METRICS,
    PSNR,
    SSIM,
    MetricSuite,
    PairedMetric,
    lpips_backbone_path,
    psnr,
    ssim,
)
from hessdiff.eval.metrics.weights import MissingWeightsError, default_cache_dir, ensure_weights_file

__all__ = [
    "INCEPTION_FILENAME",
    "INCEPTION_URL",
    "LPIPS",
    "LPIPS_BACKBONES",
    "METRICS",
    "PSNR",
    "SSIM",
    "CleanFIDInception",
    "DistributionMetrics",
    "FeatureExtractor",
    "FeatureStats",
    "MetricSuite",
    "MissingWeightsError",
    "NamedExtractor",
    "PairedMetric",
    "component_tv",
    "default_cache_dir",
    "ensure_weights_file",
    "extractor_name",
    "fid_from_stats",
    "folder_feature_stats",
    "frechet_distance",
    "gaussian_w2",
    "inception_weights_path",
    "kernel_inception_distance",
    "lpips_backbone_path",
    "posterior_mean_error",
    "psnr",
    "random_directions",
    "sliced_wasserstein",
    "ssim",
    "wasserstein1_1d",
]
