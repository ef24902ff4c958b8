"""Kernels, masks and noise: normalisation, seeding, reproducibility, statistics and errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hessdiff.tasks import (
    GaussianNoise,
    PoissonNoise,
    box_mask,
    freeform_mask,
    from_scale,
    load_kernel,
    motion_blur_kernel,
    png_mask,
    random_mask,
)
from hessdiff.tasks._random import beta_1b, beta_int, generators_for_batch, triangular


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------- motion kernels
@pytest.mark.parametrize("size,intensity", [(61, 0.5), (15, 0.0), (31, 1.0)])
def test_motion_kernel_normalised_seeded_reproducible(size, intensity):
    k1 = motion_blur_kernel(size, intensity, _gen(3))
    k2 = motion_blur_kernel(size, intensity, _gen(3))
    k3 = motion_blur_kernel(size, intensity, _gen(4))
    assert k1.shape == (size, size) and k1.dtype == torch.float64
    assert torch.equal(k1, k2)
    assert not torch.equal(k1, k3)
    assert abs(float(k1.sum()) - 1.0) < 1e-12
    assert float(k1.min()) >= 0.0
    # a trajectory, not a point or a full square: spread over several pixels, far from uniform
    support = int((k1 > 1e-3 * float(k1.max())).sum())
    assert 3 <= support < size * size // 2


def test_motion_kernel_does_not_touch_global_rng():
    state = torch.random.get_rng_state()
    motion_blur_kernel(15, 0.5, _gen(0))
    assert torch.equal(state, torch.random.get_rng_state())


def test_motion_kernel_intensity_controls_curvature():
    """Intensity 0 gives straight paths: the kernel's mass lies close to a line (second moment
    eigen-ratio small); intensity 1 paths bend, so the ratio is larger on average."""

    def anisotropy(k: torch.Tensor) -> float:
        n = k.shape[0]
        r = torch.arange(n, dtype=torch.float64)
        yy, xx = torch.meshgrid(r, r, indexing="ij")
        my, mx = float((k * yy).sum()), float((k * xx).sum())
        cyy = float((k * (yy - my) ** 2).sum())
        cxx = float((k * (xx - mx) ** 2).sum())
        cxy = float((k * (yy - my) * (xx - mx)).sum())
        ev = np.linalg.eigvalsh(np.array([[cyy, cxy], [cxy, cxx]]))
        return ev[0] / ev[1]

    straight = np.mean([anisotropy(motion_blur_kernel(31, 0.0, _gen(s))) for s in range(8)])
    curved = np.mean([anisotropy(motion_blur_kernel(31, 1.0, _gen(s))) for s in range(8)])
    assert straight < curved


def test_motion_kernel_errors():
    with pytest.raises(ValueError, match="odd"):
        motion_blur_kernel(60, 0.5, _gen(0))
    with pytest.raises(ValueError, match="intensity"):
        motion_blur_kernel(61, 1.5, _gen(0))


def test_load_kernel(tmp_path):
    k = torch.rand(5, 7, generator=_gen(1), dtype=torch.float64)
    np.save(tmp_path / "k.npy", k.numpy())
    torch.save(k, tmp_path / "k.pt")
    for f in ("k.npy", "k.pt"):
        got = load_kernel(tmp_path / f)
        assert torch.allclose(got, k / k.sum(), atol=1e-15)
    np.save(tmp_path / "even.npy", np.ones((4, 4)))
    with pytest.raises(ValueError, match="odd"):
        load_kernel(tmp_path / "even.npy")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.png"):
        load_kernel(tmp_path / "bad.png")
    with pytest.raises(FileNotFoundError, match="missing.npy"):
        load_kernel(tmp_path / "missing.npy")


# ---------------------------------------------------------------------- samplers of random numbers
def test_distribution_helpers_have_right_means():
    g = _gen(5)
    n = 40000
    b = beta_1b(g, 30.0, n)
    assert abs(float(b.mean()) - 1 / 31) < 5 * math.sqrt(30 / (31**2 * 32) / n)
    draws = torch.tensor([beta_int(g, 2, 20) for _ in range(4000)], dtype=torch.float64)
    var = 2 * 20 / (22**2 * 23)
    assert abs(float(draws.mean()) - 2 / 22) < 5 * math.sqrt(var / 4000)
    t = triangular(g, 0.0, 0.25, 1.0, n)
    assert abs(float(t.mean()) - 1.25 / 3) < 5 * math.sqrt((1 + 0.0625 - 0.25) / 18 / n)
    assert float(t.min()) >= 0.0 and float(t.max()) <= 1.0


def test_generators_for_batch_rules():
    gens, seeds = generators_for_batch(10, 3)
    assert seeds == [10, 11, 12]
    assert torch.equal(torch.rand(4, generator=gens[1]), torch.rand(4, generator=_gen(11)))
    _, seeds = generators_for_batch([5, 1], 2)
    assert seeds == [5, 1]
    with pytest.raises(ValueError, match="2 seeds/generators for a batch of 3"):
        generators_for_batch([1, 2], 3)
    with pytest.raises(ValueError, match="non-negative"):
        generators_for_batch(-1, 1)


# ---------------------------------------------------------------------- masks
def test_box_mask_center_and_random():
    m = box_mask(37, 31, (9, 5), "center")
    assert m.shape == (1, 37, 31)
    holes = (m[0] == 0).nonzero()
    assert int(holes[:, 0].min()) == 14 and int(holes[:, 1].min()) == 13
    assert int((m == 0).sum()) == 45
    tops = set()
    for s in range(30):
        r = box_mask(64, 64, 32, "random", margin=8, generator=_gen(s))
        h = (r[0] == 0).nonzero()
        top, left = int(h[:, 0].min()), int(h[:, 1].min())
        assert 8 <= top <= 64 - 8 - 32 and 8 <= left <= 64 - 8 - 32
        assert int((r == 0).sum()) == 32 * 32
        tops.add(top)
    assert len(tops) > 5
    assert torch.equal(box_mask(64, 64, 32, "random", 8, _gen(1)), box_mask(64, 64, 32, "random", 8, _gen(1)))
    with pytest.raises(ValueError, match="does not fit"):
        box_mask(30, 30, 28, "random", margin=2, generator=_gen(0))


def test_random_mask_exact_fraction_shared_or_per_channel():
    m = random_mask(37, 31, 0.92, channels=3, shared_channels=True, generator=_gen(0))
    assert m.shape == (1, 37, 31)
    assert int((m == 0).sum()) == math.floor(0.92 * 37 * 31)
    p = random_mask(37, 31, 0.5, channels=3, shared_channels=False, generator=_gen(0))
    assert p.shape == (3, 37, 31)
    assert int((p == 0).sum()) == math.floor(0.5 * 3 * 37 * 31)
    assert not torch.equal(p[0], p[1])
    r1 = random_mask(20, 20, (0.3, 0.7), generator=_gen(2))
    r2 = random_mask(20, 20, (0.3, 0.7), generator=_gen(2))
    assert torch.equal(r1, r2)
    assert 0.3 * 400 - 1 <= int((r1 == 0).sum()) <= 0.7 * 400
    with pytest.raises(ValueError, match=r"drop fraction must be in \[0, 1\]"):
        random_mask(8, 8, 1.2, generator=_gen(0))


def test_freeform_mask_coverage_and_seed():
    m = freeform_mask(48, 40, (0.15, 0.35), _gen(7))
    frac = float((m == 0).double().mean())
    assert 0.15 <= frac <= 0.35
    assert torch.equal(m, freeform_mask(48, 40, (0.15, 0.35), _gen(7)))
    assert not torch.equal(m, freeform_mask(48, 40, (0.15, 0.35), _gen(8)))
    with pytest.raises(RuntimeError, match="did not give a hole fraction"):
        freeform_mask(16, 16, (0.5, 0.5000001), _gen(0), max_strokes=5)


def test_png_mask(tmp_path):
    from PIL import Image

    arr = np.zeros((12, 10), dtype=np.uint8)
    arr[:, :4] = 255
    Image.fromarray(arr).save(tmp_path / "m.png")
    m = png_mask(tmp_path / "m.png", 12, 10)
    assert m.shape == (1, 12, 10)
    assert float(m[0, :, :4].min()) == 1.0 and float(m[0, :, 4:].max()) == 0.0
    assert torch.equal(png_mask(tmp_path / "m.png", keep="black"), 1 - m)
    with pytest.raises(ValueError, match="is 12x10 but the image is 12x11"):
        png_mask(tmp_path / "m.png", 12, 11)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(ValueError, match="cannot read a mask image from .*broken.png"):
        png_mask(tmp_path / "broken.png")
    with pytest.raises(FileNotFoundError, match="nothere.png"):
        png_mask(tmp_path / "nothere.png")


def test_png_mask_16bit_levels_are_scaled_not_clipped(tmp_path):
    from PIL import Image

    arr = np.full((4, 6), 65535, dtype=np.uint16)
    arr[:, :2] = 20000  # about 78 of 255: a hole at threshold 128 (clipping to 8 bits would make it 255)
    Image.fromarray(arr).save(tmp_path / "m16.png")
    m = png_mask(tmp_path / "m16.png")
    assert float(m[0, :, :2].max()) == 0.0 and float(m[0, :, 2:].min()) == 1.0


# ---------------------------------------------------------------------- noise
def test_from_scale_conversions():
    assert from_scale(0.025, "[0,1]") == pytest.approx(0.05, rel=1e-15)
    assert from_scale(12.75, "0-255") == pytest.approx(0.1, rel=1e-15)
    assert from_scale(0.05, "[-1,1]") == 0.05
    assert GaussianNoise.from_scale(0.025, "[0, 1]").sigma == pytest.approx(0.05)
    with pytest.raises(ValueError, match="unknown value scale"):
        from_scale(0.1, "percent")
    with pytest.raises(ValueError, match="non-negative"):
        from_scale(-0.1, "[0,1]")


def test_gaussian_noise_statistics_and_errors():
    y = torch.zeros(4, 3, 64, 64, dtype=torch.float64)
    sigma = 0.05
    n = GaussianNoise(sigma)(y, [_gen(s) for s in range(4)])
    count = n.numel()
    assert abs(float(n.mean())) < 5 * sigma / math.sqrt(count)
    assert abs(float(n.std()) / sigma - 1) < 5 / math.sqrt(2 * count)
    with pytest.raises(ValueError, match="sigma_y must be a finite non-negative"):
        GaussianNoise(-0.01)
    with pytest.raises(ValueError, match="NaN or Inf"):
        GaussianNoise(0.1)(torch.full((1, 2), float("nan")), _gen(0))
    with pytest.raises(ValueError, match="need a torch.Generator"):
        GaussianNoise(0.1)(y, None)


def test_noise_per_image_independent_of_batch_and_dtype():
    y = torch.zeros(3, 1, 8, 8, dtype=torch.float64)
    batch = GaussianNoise(0.1)(y, [_gen(10 + i) for i in range(3)])
    single = GaussianNoise(0.1)(y[2:], [_gen(12)])
    assert torch.equal(batch[2:], single)
    as32 = GaussianNoise(0.1)(y[2:].float(), [_gen(12)])
    assert torch.equal(as32, single.float())


def test_poisson_noise_statistics():
    u = 0.4  # on [0, 1]; y = 2u - 1
    y = torch.full((2, 3, 64, 64), 2 * u - 1, dtype=torch.float64)
    rate = 0.2
    out = PoissonNoise(rate, clip=False)(y, [_gen(0), _gen(1)])
    back = (out + 1) / 2  # counts / (255 rate)
    peak = 255 * rate
    lam = u * peak
    count = out.numel()
    assert abs(float(back.mean()) - u) < 5 * math.sqrt(lam) / peak / math.sqrt(count)
    assert abs(float(back.var()) / (lam / peak**2) - 1) < 0.05
    assert torch.equal(out, PoissonNoise(rate, clip=False)(y, [_gen(0), _gen(1)]))
    with pytest.raises(ValueError, match="rate must be a finite positive"):
        PoissonNoise(0.0)
