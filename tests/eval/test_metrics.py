"""Tests of the preprocessing path and the paired metrics (PSNR, SSIM, LPIPS) and MetricSuite."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
import warnings

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from hessdiff.eval import (
    LPIPS,
    METRICS,
    MetricSuite,
    MissingWeightsError,
    PairedMetric,
    as_float_image,
    lpips_backbone_path,
    psnr,
    ssim,
    to_unit,
)
from hessdiff.utils.images import from_uint8, to_uint8


def _images(seed: int, shape=(3, 3, 37, 31), dtype=torch.float64, spread: float = 1.1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g, dtype=dtype) * 2 - 1) * spread


def _noisy(x: torch.Tensor, seed: int, scale: float = 0.3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return x + scale * torch.randn(x.shape, generator=g, dtype=x.dtype)


def _random_backbone(net: str, seed: int) -> dict[str, torch.Tensor]:
    """A torchvision-keyed state dict (``features.<i>.*``) of a randomly initialised AlexNet / VGG-16 trunk."""
    from torchvision.models import alexnet
    from torchvision.models.vgg import cfgs, make_layers

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        features = alexnet().features if net == "alex" else make_layers(cfgs["D"])
    return {f"features.{k}": v.clone() for k, v in features.state_dict().items()}


@pytest.fixture(scope="module")
def backbones():
    """Random trunk weights and our LPIPS built on them, shared by the tests of this module."""
    out = {}
    for net in ("alex", "vgg"):
        state = _random_backbone(net, seed=5)
        out[net] = (state, METRICS[f"lpips_{net}"](backbone_weights=state))  # built through the registry
    return out


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    """No test may reach the network; torchvision's cache points at an empty folder."""

    def refuse(*args, **kwargs):
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


# ---- preprocessing -----------------------------------------------------------------------------


def test_uint8_round_trip_is_exact_for_every_value():
    u = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(to_uint8(from_uint8(u)), u)
    assert torch.equal(to_uint8(from_uint8(u, torch.float64)), u)


def test_to_uint8_clips_and_rounds():
    x = torch.tensor([-3.0, -1.0, -1 + 1 / 255, 0.0, 1 - 1 / 255, 1.0, 7.0])
    # (x+1)/2*255: clip -> 0, 0, 0.5 (half to even -> 0), 127.5 (-> 128), 254.5 (-> 254), 255, clip -> 255
    assert to_uint8(x).tolist() == [0, 0, 0, 128, 254, 255, 255]
    with pytest.raises(ValueError, match="NaN"):
        to_uint8(torch.tensor([0.0, float("nan")]))
    with pytest.raises(TypeError):
        to_uint8(torch.zeros(3, dtype=torch.uint8))


def test_float_image_is_clipped_not_rescaled():
    x = torch.tensor([[-2.0, -0.5], [0.25, 3.0]]).expand(1, 3, 2, 2)
    y = as_float_image(x)
    assert y.tolist()[0][0] == [[-1.0, -0.5], [0.25, 1.0]]
    assert torch.equal(to_unit(x)[0, 0], torch.tensor([[0.0, 0.25], [0.625, 1.0]], dtype=torch.float64))
    with pytest.raises(ValueError, match="shape"):
        as_float_image(torch.zeros(2, 4, 8, 8))


# ---- PSNR / SSIM parity with scikit-image -----------------------------------------------------


def _skimage_per_image(fn, u: np.ndarray, v: np.ndarray, **kw) -> np.ndarray:
    return np.array([fn(u[i].transpose(1, 2, 0), v[i].transpose(1, 2, 0), **kw) for i in range(u.shape[0])])


SSIM_KW = {"gaussian_weights": True, "sigma": 1.5, "use_sample_covariance": False, "channel_axis": -1}


def test_psnr_ssim_parity_with_skimage_float():
    x = _images(0)  # values beyond [-1, 1] exercise the clipping
    y = _noisy(x, 1)
    u, v = to_unit(x).numpy(), to_unit(y).numpy()
    ref_p = _skimage_per_image(peak_signal_noise_ratio, u, v, data_range=1)
    ref_s = _skimage_per_image(structural_similarity, u, v, data_range=1, **SSIM_KW)
    p, s = psnr(x, y), ssim(x, y)
    assert p.dtype == s.dtype == torch.float64 and p.shape == s.shape == (3,)
    np.testing.assert_allclose(p.numpy(), ref_p, rtol=0, atol=1e-10)
    np.testing.assert_allclose(s.numpy(), ref_s, rtol=0, atol=1e-10)
    assert len(set(np.round(ref_s, 6))) == 3  # distinct per-image values, so the batch axis matters


def test_psnr_ssim_parity_with_skimage_uint8():
    x = to_uint8(_images(2, shape=(2, 3, 23, 40)))
    y = to_uint8(_noisy(_images(2, shape=(2, 3, 23, 40)), 3, 0.2))
    u, v = x.numpy(), y.numpy()
    ref_p = _skimage_per_image(peak_signal_noise_ratio, u, v, data_range=255)
    ref_s = _skimage_per_image(structural_similarity, u, v, data_range=255, **SSIM_KW)
    np.testing.assert_allclose(psnr(x, y).numpy(), ref_p, rtol=0, atol=1e-10)
    np.testing.assert_allclose(ssim(x, y).numpy(), ref_s, rtol=0, atol=1e-10)
    # uint8 input equals the same image given as float in [-1, 1]
    np.testing.assert_allclose(ssim(from_uint8(x, torch.float64), y).numpy(), ref_s, rtol=0, atol=1e-10)


def test_psnr_ssim_identity_and_errors():
    x = _images(4, shape=(2, 3, 11, 12))
    assert torch.isinf(psnr(x, x)).all()
    assert torch.allclose(ssim(x, x), torch.ones(2, dtype=torch.float64), atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(x[..., :10, :], x[..., :10, :])
    with pytest.raises(ValueError, match="same shape"):
        psnr(x, x[:1])
    with pytest.raises(ValueError, match="NaN"):
        psnr(x, torch.full_like(x, float("nan")))


# ---- LPIPS ---------------------------------------------------------------------------------------


def _reference_lpips(monkeypatch, net: str, state: dict[str, torch.Tensor]):
    """The lpips package's own model whose trunk comes from torchvision with ``state`` loaded."""
    import lpips
    from torchvision import models

    ctor_name = {"alex": "alexnet", "vgg": "vgg16"}[net]
    real_ctor = getattr(models, ctor_name)

    def ctor(pretrained=False, **kwargs):
        model = real_ctor(weights=None)
        model.load_state_dict({**model.state_dict(), **state})
        return model

    monkeypatch.setattr(lpips.pretrained_networks.tv, ctor_name, ctor)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lpips.LPIPS(pretrained=True, net=net, version="0.1", verbose=False).eval()


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_parity_with_package(monkeypatch, backbones, net):
    state, ours = backbones[net]  # built before the torchvision constructor is patched below
    other = LPIPS(net, backbone_weights=_random_backbone(net, seed=6)) if net == "alex" else None
    ref = _reference_lpips(monkeypatch, net, state)
    x = _images(6, shape=(3, 3, 37, 31), dtype=torch.float32, spread=1.0)
    y = _noisy(x, 7, 0.2).clamp(-1, 1)
    with torch.no_grad():
        expected = ref(x, y).reshape(-1).double()
    got = ours(x, y)
    assert got.dtype == torch.float64 and got.shape == (3,)
    assert expected.abs().min() > 1e-4  # a non-trivial value
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-7)
    assert ours.info[f"lpips_{net}_net"] == net and ours.name == f"lpips_{net}"
    if other is not None:  # a differently seeded backbone gives other values: the weights are used
        assert (other(x, y) - got).abs().max() > 1e-4


def test_lpips_loads_backbone_from_torch_home(tmp_path):
    state = _random_backbone("alex", seed=8)
    path = lpips_backbone_path("alex")
    assert path.name == "alexnet-owt-7be5be79.pth"
    assert path.parent == tmp_path / "torch_home" / "hub" / "checkpoints"
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    x = _images(9, shape=(2, 3, 32, 32), dtype=torch.float32, spread=1.0)
    y = x.flip(0)
    a = LPIPS("alex", download=False)(x, y)
    b = LPIPS("alex", backbone_weights=state)(x, y)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("net,filename", [("alex", "alexnet-owt-7be5be79.pth"), ("vgg", "vgg16-397923af.pth")])
def test_lpips_missing_weights_error_names_the_path(tmp_path, net, filename):
    expected = tmp_path / "torch_home" / "hub" / "checkpoints" / filename
    with pytest.raises(MissingWeightsError) as info:
        LPIPS(net, download=False)
    assert str(expected) in str(info.value) and info.value.path == expected
    # with downloads allowed the (refused) network attempt fails fast, leaving no partial file
    start = time.perf_counter()
    with pytest.raises(MissingWeightsError, match="network disabled") as info:
        LPIPS(net, download=True)
    assert time.perf_counter() - start < 5
    assert str(expected) in str(info.value) and "https://download.pytorch.org/models/" + filename in str(info.value)
    assert not expected.exists() and list(expected.parent.glob(".*.tmp")) == []


def test_lpips_bad_backbone_name():
    with pytest.raises(ValueError, match="unknown LPIPS backbone"):
        LPIPS("squeezy")


# ---- registry and suite --------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(METRICS))
def test_registry_members_follow_the_protocol(name, backbones):
    # LPIPS models were built through METRICS by the fixture (VGG is slow to build twice)
    metric = backbones[name.split("_")[1]][1] if name.startswith("lpips") else METRICS[name]()
    assert isinstance(metric, PairedMetric) and metric.name == name and metric.info
    x = _images(12, shape=(2, 3, 33, 35), dtype=torch.float32, spread=1.0)
    y = _noisy(x, 13, 0.3)
    same, diff = metric(x, x), metric(x, y)
    assert same.shape == diff.shape == (2,) and same.dtype == torch.float64
    if metric.higher_is_better:
        assert (same > diff).all()
    else:
        assert (same.abs() < 1e-6).all() and (diff > same).all()
    if name != "lpips_vgg":  # uint8 and float inputs agree (same code path for both LPIPS nets; VGG is slow)
        xu, yu = to_uint8(x), to_uint8(y)
        torch.testing.assert_close(metric(xu, yu), metric(from_uint8(xu), from_uint8(yu)))


def test_suite_marks_missing_lpips_and_keeps_going(tmp_path):
    x = _images(14, shape=(4, 3, 16, 16), dtype=torch.float32, spread=1.0)
    y = _noisy(x, 15)
    with pytest.warns(UserWarning, match="lpips_alex is skipped"):
        suite = MetricSuite(("psnr", "ssim", "lpips_alex"), download=False)
    suite.update(x[:3], y[:3])
    suite.update(x[3:], y[3:])
    res = suite.compute()
    assert res["num_images"] == 4
    assert res["psnr"] == pytest.approx(float(psnr(x, y).mean()), rel=1e-12)
    assert res["ssim"] == pytest.approx(float(ssim(x, y).mean()), rel=1e-12)
    assert res["lpips_alex"] is None and res["lpips_alex_net"] == "alex"
    assert "alexnet-owt-7be5be79.pth" in res["missing"]["lpips_alex"]
    assert str(tmp_path / "torch_home" / "hub" / "checkpoints") in res["missing"]["lpips_alex"]
    with pytest.raises(MissingWeightsError):
        MetricSuite(("psnr", "lpips_alex"), download=False, on_missing="raise")
    with pytest.raises(ValueError, match="unknown metric"):
        MetricSuite(("psnr", "fidd"))


def test_suite_with_injected_lpips_weights(backbones):
    x = _images(16, shape=(2, 3, 32, 32), dtype=torch.float32, spread=1.0)
    y = _noisy(x, 17)
    kwargs = {"lpips_alex": {"backbone_weights": backbones["alex"][0]}}
    suite = MetricSuite(("psnr", "lpips_alex"), metric_kwargs=kwargs)
    per_image = suite.update(x, y)
    res = suite.compute()
    assert res["missing"] == {} and res["lpips_alex_net"] == "alex"
    assert res["lpips_alex"] == pytest.approx(float(per_image["lpips_alex"].mean()), rel=1e-12)
    assert res["lpips_alex"] > 0
