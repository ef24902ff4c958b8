"""Evaluation: image metrics (PSNR, SSIM, LPIPS, FID, KID), their image preprocessing and datasets.

Layers: :mod:`hessdiff.eval.metrics` (the metrics, library code), :mod:`hessdiff.eval.images` and
:mod:`hessdiff.eval.data` (the metrics' image preprocessing and image-folder datasets), and
:mod:`hessdiff.eval.sweep` (the benchmark-sweep machinery on top of them, not imported here).
Image files and the float / uint8 convention are :mod:`hessdiff.utils.images`.

Heavy libraries (lpips, clean-fid, torchvision, PIL) are imported only when used.
"""

from hessdiff.eval.data import ImageFolderDataset, ImageItem, list_image_files
from hessdiff.eval.images import RESIZE_MODES, as_float_image, as_uint8_image, resize_image, to_unit
from hessdiff.eval.metrics import (
    LPIPS,
    METRICS,
    PSNR,
    SSIM,
    CleanFIDInception,
    DistributionMetrics,
    FeatureExtractor,
    FeatureStats,
    MetricSuite,
    MissingWeightsError,
    NamedExtractor,
    PairedMetric,
    component_tv,
    default_cache_dir,
    fid_from_stats,
    folder_feature_stats,
    frechet_distance,
    gaussian_w2,
    inception_weights_path,
    kernel_inception_distance,
    lpips_backbone_path,
    posterior_mean_error,
    psnr,
    sliced_wasserstein,
    ssim,
)

__all__ = [
    "component_tv",
    "gaussian_w2",
    "posterior_mean_error",
    "sliced_wasserstein",
    "CleanFIDInception",
    "DistributionMetrics",
    "FeatureExtractor",
    "FeatureStats",
    "ImageFolderDataset",
    "ImageItem",
    "LPIPS",
    "METRICS",
    "MetricSuite",
    "MissingWeightsError",
    "NamedExtractor",
    "PSNR",
    "PairedMetric",
    "RESIZE_MODES",
    "SSIM",
    "as_float_image",
    "as_uint8_image",
    "default_cache_dir",
    "fid_from_stats",
    "folder_feature_stats",
    "frechet_distance",
    "inception_weights_path",
    "kernel_inception_distance",
    "list_image_files",
    "lpips_backbone_path",
    "psnr",
    "resize_image",
    "ssim",
    "to_unit",
]
