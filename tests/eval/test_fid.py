"""Tests of FID/KID: streaming statistics, Fréchet distance parity, clean-fid parity, caching, weights."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from hessdiff.eval import (
    CleanFIDInception,
    DistributionMetrics,
    FeatureStats,
    MetricSuite,
    MissingWeightsError,
    NamedExtractor,
    fid_from_stats,
    folder_feature_stats,
    frechet_distance,
    inception_weights_path,
    kernel_inception_distance,
)
from hessdiff.eval.metrics import fid as fidmod
from hessdiff.utils.images import from_uint8

# clean-fid's own frechet_distance (the parity reference) calls scipy's sqrtm with a deprecated argument
pytestmark = pytest.mark.filterwarnings("ignore:The `disp` argument is deprecated:DeprecationWarning")


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    """No network; caches point into the test's temporary folder."""

    def refuse(*args, **kwargs):
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(fidmod, "_cleanfid_inception_path", lambda: tmp_path / "cleanfid" / "inception-2015-12-05.pt")


def _gaussian_features(n: int, dim: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=g, dtype=torch.float64) / dim**0.5
    return torch.randn(n, dim, generator=g, dtype=torch.float64) @ mix + shift


def _scipy_fid(mu1, s1, mu2, s2) -> float:
    """The textbook formula with scipy's sqrtm (the reference implementation)."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


# ---- streaming statistics ----------------------------------------------------------------------


def test_feature_stats_match_numpy_in_any_split():
    f = _gaussian_features(103, 12, seed=0, shift=50.0)  # a large mean tests cancellation
    whole = FeatureStats().update(f)
    parts = [FeatureStats().update(f[:7]), FeatureStats().update(f[7:60]), FeatureStats().update(f[60:])]
    merged = parts[2].merge(parts[0]).merge(parts[1])
    streamed = FeatureStats()
    for chunk in torch.split(f.float(), 10):  # float32 input is upcast
        streamed.update(chunk)
    ref_mu, ref_cov = f.numpy().mean(0), np.cov(f.numpy(), rowvar=False)
    for stats in (whole, merged):
        assert stats.n == 103 and stats.mean.dtype == torch.float64
        np.testing.assert_allclose(stats.mean.numpy(), ref_mu, rtol=1e-13)
        np.testing.assert_allclose(stats.cov.numpy(), ref_cov, rtol=1e-11, atol=1e-13)
    f32 = f.float().double().numpy()
    np.testing.assert_allclose(streamed.cov.numpy(), np.cov(f32, rowvar=False), rtol=1e-11, atol=1e-13)


def test_feature_stats_errors_and_kept_features(tmp_path):
    stats = FeatureStats(keep_features=True)
    with pytest.raises(ValueError, match="no features"):
        _ = stats.mean
    stats.update(np.ones((1, 4)))
    with pytest.raises(ValueError, match="at least 2"):
        _ = stats.cov
    with pytest.raises(ValueError, match="dimension mismatch"):
        stats.update(np.ones((2, 5)))
    with pytest.raises(ValueError, match="NaN"):
        stats.update(np.full((2, 4), np.nan))
    with pytest.raises(ValueError, match="shape"):
        stats.update(np.ones(4))
    f = _gaussian_features(9, 4, seed=1)
    stats.update(f)
    assert torch.equal(stats.features, torch.cat([torch.ones(1, 4), f.float()]))
    path = stats.save(tmp_path / "s.npz", meta={"what": "test"})
    loaded = FeatureStats.load(path)
    assert loaded.n == 10 and torch.equal(loaded.mean, stats.mean) and torch.equal(loaded.cov, stats.cov)
    assert torch.equal(loaded.features, stats.features)
    np.savez(tmp_path / "cleanfid_style.npz", mu=np.zeros(4), sigma=np.eye(4))
    with pytest.raises(ValueError, match="not a hessdiff"):
        FeatureStats.load(tmp_path / "cleanfid_style.npz")
    with pytest.raises(ValueError, match="not kept"):
        _ = FeatureStats().update(f).features


# ---- Fréchet distance ------------------------------------------------------------------------------


def test_fid_of_a_set_with_itself_is_zero():
    for n, dim in ((200, 32), (20, 32)):  # full rank and rank deficient covariance
        s = FeatureStats().update(_gaussian_features(n, dim, seed=2, shift=3.0))
        value = fid_from_stats(s, s)
        assert abs(value) < 1e-10 * float(torch.trace(s.cov))


def test_frechet_distance_parity_with_scipy_and_cleanfid():
    from cleanfid.fid import frechet_distance as cleanfid_frechet

    a = FeatureStats().update(_gaussian_features(300, 48, seed=3))
    b = FeatureStats().update(_gaussian_features(250, 48, seed=4, shift=0.2) * 1.3)
    mu1, s1, mu2, s2 = (t.numpy() for t in (a.mean, a.cov, b.mean, b.cov))
    ours = frechet_distance(mu1, s1, mu2, s2)
    ref = _scipy_fid(mu1, s1, mu2, s2)
    assert ours > 1.0
    assert abs(ours - ref) <= 1e-10 * ref
    assert abs(ours - cleanfid_frechet(mu1, s1, mu2, s2)) <= 1e-10 * ref
    # rank-deficient covariances (fewer samples than dimensions): the square root is ill-conditioned,
    # so agreement is limited by scipy's sqrtm of a singular product
    c = FeatureStats().update(_gaussian_features(30, 48, seed=5))
    d = FeatureStats().update(_gaussian_features(40, 48, seed=6, shift=0.1))
    mu3, s3, mu4, s4 = (t.numpy() for t in (c.mean, c.cov, d.mean, d.cov))
    assert abs(frechet_distance(mu3, s3, mu4, s4) - _scipy_fid(mu3, s3, mu4, s4)) <= 1e-7 * _scipy_fid(mu3, s3, mu4, s4)
    with pytest.raises(ValueError, match="shape mismatch"):
        frechet_distance(mu1, s1, mu2[:-1], s2)
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(mu1 * np.nan, s1, mu2, s2)


def test_kid_parity_with_cleanfid_and_subsets():
    from cleanfid.fid import kernel_distance

    x = _gaussian_features(40, 16, seed=7).numpy()
    y = _gaussian_features(40, 16, seed=8, shift=0.3).numpy()
    # one subset containing every sample: clean-fid's random choice is then only a permutation
    ours, std = kernel_inception_distance(x, y, num_subsets=1, max_subset_size=1000)
    assert std == 0.0
    assert ours == pytest.approx(kernel_distance(x, y, num_subsets=1, max_subset_size=1000), rel=1e-12, abs=1e-15)
    assert ours > 0
    # subsets come from the given seed/generator only
    k1 = kernel_inception_distance(x, y, num_subsets=5, max_subset_size=20, seed=1)
    k2 = kernel_inception_distance(x, y, num_subsets=5, max_subset_size=20, generator=torch.Generator().manual_seed(1))
    k3 = kernel_inception_distance(x, y, num_subsets=5, max_subset_size=20, seed=2)
    assert k1 == k2 and k1 != k3 and k1[1] > 0
    with pytest.raises(ValueError, match="dimensions differ"):
        kernel_inception_distance(x, y[:, :3])


# ---- image folders and clean-fid parity ------------------------------------------------------------


def _write_folder(root, n: int, seed: int, size=(16, 16), offset: int = 0) -> list:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        arr = np.clip(rng.normal(128 + offset, 50, size=(*size, 3)), 0, 255).astype(np.uint8)
        paths.append(root / f"{i:05d}.png")
        Image.fromarray(arr).save(paths[-1])
    return paths


def _toy_features(images: torch.Tensor) -> torch.Tensor:
    """A fixed 8-d feature: per-channel means and standard deviations, plus two cross terms (float64)."""
    x = images.to(torch.float64) / 255
    m, s = x.mean((2, 3)), x.std((2, 3))
    return torch.cat([m, s, (x[:, :1] * x[:, 1:2]).mean((2, 3)), (x[:, 2:] ** 3).mean((2, 3))], 1)


def test_fid_parity_with_cleanfid_compute_fid(tmp_path):
    from cleanfid import fid as cleanfid

    d1, d2 = tmp_path / "a", tmp_path / "b"
    _write_folder(d1, 24, seed=0)
    _write_folder(d2, 20, seed=1, offset=10)
    extractor = NamedExtractor(_toy_features, "toy-8")
    ours = fid_from_stats(
        folder_feature_stats(d1, extractor, use_cache=False), folder_feature_stats(d2, extractor, use_cache=False)
    )
    ref = cleanfid.compute_fid(
        str(d1),
        str(d2),
        mode="clean",
        custom_feat_extractor=_toy_features,
        custom_fn_resize=lambda a: a.astype(np.float32),  # no resize: both see the stored pixels
        device=torch.device("cpu"),
        num_workers=0,
        batch_size=7,
        verbose=False,
    )
    assert ours > 1e-3
    assert abs(ours - ref) <= 1e-10 * ref


class _FakeInceptionLayers(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.pool = torch.nn.AdaptiveAvgPool2d(5)
        self.proj = torch.nn.Parameter(torch.randn(75, 2048, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.pool(x).flatten(1) @ self.proj)


class _FakeInception(torch.nn.Module):
    """Stands in for inception-2015-12-05.pt: same interface (a ``layers`` sub-module)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = _FakeInceptionLayers()

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return self.layers(x)


def _save_fake_inception(path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(_FakeInception()).save(str(path))


def test_clean_inception_pipeline_matches_cleanfid(tmp_path):
    """Our default extractor resizes and normalises exactly as clean-fid (weights replaced by a fake)."""
    from cleanfid.fid import get_folder_features
    from cleanfid.inception_torchscript import InceptionV3W

    _save_fake_inception(inception_weights_path())
    folder = tmp_path / "imgs"
    _write_folder(folder, 5, seed=2, size=(37, 31))
    extractor = CleanFIDInception(download=False)
    assert extractor.weights_path == inception_weights_path()
    ours = folder_feature_stats(folder, extractor, keep_features=True, use_cache=False).features
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = InceptionV3W(str(inception_weights_path().parent), download=False)
    ref = get_folder_features(
        str(folder), model, num_workers=0, batch_size=2, device=torch.device("cpu"), mode="clean", verbose=False
    )
    assert ours.shape == (5, 2048)
    np.testing.assert_allclose(ours.numpy(), ref, rtol=0, atol=1e-6)
    assert np.abs(ref).max() > 0.1


def test_inception_missing_weights_error_names_the_path(tmp_path):
    expected = tmp_path / "xdg" / "hessdiff" / "weights" / "inception-2015-12-05.pt"
    assert inception_weights_path() == expected
    with pytest.raises(MissingWeightsError) as info:
        CleanFIDInception(download=False)
    assert str(expected) in str(info.value) and info.value.filename == "inception-2015-12-05.pt"
    start = time.perf_counter()
    with pytest.raises(MissingWeightsError, match="network disabled") as info:
        CleanFIDInception(download=True)
    assert time.perf_counter() - start < 5
    assert str(expected) in str(info.value) and fidmod.INCEPTION_URL in str(info.value)
    assert not expected.exists() and list(expected.parent.glob(".*.tmp")) == []
    # clean-fid's own download location (/tmp, writable by every user) is not trusted; the error says so
    planted = fidmod._cleanfid_inception_path()
    _save_fake_inception(planted)
    with pytest.raises(MissingWeightsError, match="is not used: that folder is writable by every user") as info:
        CleanFIDInception(download=False)
    assert str(expected) in str(info.value)


# ---- caching -----------------------------------------------------------------------------------


class _Counting:
    def __init__(self, name: str = "toy-8") -> None:
        self.name, self.calls = name, 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return _toy_features(images)


def test_folder_stats_cached_by_content(tmp_path):
    folder, cache = tmp_path / "ref", tmp_path / "cache"
    paths = _write_folder(folder, 6, seed=3)
    ext = _Counting()
    first = folder_feature_stats(folder, ext, cache_dir=cache, batch_size=4)
    assert ext.calls == 2 and len(list(cache.glob("toy-8-*.npz"))) == 1
    again = folder_feature_stats(folder, ext, cache_dir=cache, batch_size=4)
    assert ext.calls == 2 and torch.equal(again.mean, first.mean) and torch.equal(again.cov, first.cov)
    # moving the folder keeps the key; renaming the extractor or editing a pixel changes it
    moved = folder.rename(tmp_path / "moved")
    folder_feature_stats(moved, ext, cache_dir=cache)
    assert ext.calls == 2
    folder_feature_stats(moved, _Counting("toy-8b"), cache_dir=cache)
    assert len(list(cache.glob("*.npz"))) == 2
    arr = np.asarray(Image.open(moved / paths[0].name)).copy()
    arr[0, 0, 0] ^= 1
    Image.fromarray(arr).save(moved / paths[0].name)
    changed = folder_feature_stats(moved, ext, cache_dir=cache, batch_size=10)
    assert ext.calls == 3 and not torch.equal(changed.mean, first.mean)
    # asking for features (KID) recomputes a cache entry that lacks them
    with_feats = folder_feature_stats(moved, ext, cache_dir=cache, batch_size=10, keep_features=True)
    assert ext.calls == 4 and with_feats.features.shape == (6, 8)
    assert folder_feature_stats(moved, ext, cache_dir=cache, keep_features=True).features.shape == (6, 8)
    assert ext.calls == 4
    with pytest.raises(ValueError, match="name"):
        folder_feature_stats(moved, _toy_features, cache_dir=cache)


# ---- streaming metric objects ----------------------------------------------------------------------


def test_distribution_metrics_stream_and_report_extractor(tmp_path):
    ref_dir = tmp_path / "ref"
    _write_folder(ref_dir, 30, seed=4)
    ext = NamedExtractor(_toy_features, "toy-8")
    ref = folder_feature_stats(ref_dir, ext, keep_features=True, use_cache=False)
    g = torch.Generator().manual_seed(5)
    fake = torch.rand(25, 3, 16, 16, generator=g) * 2.4 - 1.2  # float images, partly out of range
    metric = DistributionMetrics(ref, ext, kid=True, kid_subsets=3, kid_subset_size=20)
    metric.update(fake[:10])
    metric.update(fake[10:])
    res = metric.compute()
    direct = FeatureStats().update(_toy_features(((fake.clamp(-1, 1) + 1) / 2 * 255).round().to(torch.uint8)))
    assert res["feature_extractor"] == "toy-8" and res["num_images"] == 25 and res["num_reference"] == 30
    assert res["fid"] == pytest.approx(fid_from_stats(direct, ref), rel=1e-12)
    assert res["kid"] == pytest.approx(
        kernel_inception_distance(ref.features, metric.stats.features, num_subsets=3, max_subset_size=20)[0], rel=1e-12
    )
    # the same statistics from a saved file; uint8 input equals its float version
    path = ref.save(tmp_path / "ref.npz")
    m2 = DistributionMetrics(path, ext)
    u8 = ((fake.clamp(-1, 1) + 1) / 2 * 255).round().to(torch.uint8)
    m2.update(u8)
    m3 = DistributionMetrics(path, ext)
    m3.update(from_uint8(u8))
    assert m2.compute()["fid"] == m3.compute()["fid"] == pytest.approx(res["fid"], rel=1e-12)
    with pytest.raises(ValueError, match="keep_features"):
        DistributionMetrics((ref.mean, ref.cov), ext, kid=True)


def test_suite_fid_from_folder_and_missing_inception(tmp_path):
    ref_dir = tmp_path / "ref"
    _write_folder(ref_dir, 20, seed=6, size=(20, 24))
    g = torch.Generator().manual_seed(7)
    x = torch.rand(12, 3, 16, 16, generator=g) * 2 - 1
    y = torch.rand(12, 3, 16, 16, generator=g) * 2 - 1
    ext = NamedExtractor(_toy_features, "toy-8")
    suite = MetricSuite(("psnr",), fid_reference=ref_dir, kid=True, feature_extractor=ext, reference_resolution=16,
                        fid_cache_dir=tmp_path / "cache")
    suite.update(x, y)
    res = suite.compute()
    assert res["feature_extractor"] == "toy-8" and res["missing"] == {}
    assert res["fid"] > 0 and np.isfinite(res["kid"]) and res["num_reference"] == 20
    # without an injected extractor and without Inception weights: FID/KID marked missing, PSNR computed
    with pytest.warns(UserWarning, match="fid is skipped"):
        suite = MetricSuite(("psnr",), fid_reference=ref_dir, kid=True, download=False)
    suite.update(x, y)
    res = suite.compute()
    assert res["fid"] is None and res["kid"] is None and np.isfinite(res["psnr"])
    assert res["feature_extractor"] == "inception-v3-clean-fid"
    assert str(inception_weights_path()) in res["missing"]["fid"]
