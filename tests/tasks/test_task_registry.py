"""Tasks: registry protocol, per-image determinism, presets, measurement save / load, deepinv."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hessdiff.tasks import (
    TASKS,
    Blur,
    GaussianNoise,
    Inpainting,
    LinearOperator,
    MatrixOperator,
    Measurement,
    SuperResolution,
    Task,
    as_operator,
    from_deepinv,
    gaussian_kernel,
    list_presets,
    load_measurement,
    load_preset,
    make_task,
    task_parameters,
    to_deepinv,
)

SHAPE = (3, 3, 40, 36)  # divisible by 4 for super-resolution; small so 61x61 kernels are cheap


@pytest.fixture(scope="module")
def mask_png(tmp_path_factory):
    from PIL import Image

    path = tmp_path_factory.mktemp("mask") / "mask.png"
    arr = np.full((SHAPE[2], SHAPE[3]), 255, dtype=np.uint8)
    arr[10:20, 5:30] = 0
    Image.fromarray(arr).save(path)
    return path


def _example_params(name: str, mask_png) -> dict:
    """Small settings for each registered task (defaults use the papers' sizes)."""
    return {
        "gaussian_blur": {"kernel_size": 9, "std": 2.0},
        "motion_blur": {"kernel_size": 9},
        "kernel_blur": {"kernel": [[0.0, 1.0, 0.0], [1.0, 2.0, 1.0], [0.0, 1.0, 0.0]]},
        "box_inpainting": {"box_size": 16},
        "mask_inpainting": {"mask_path": str(mask_png)},
    }.get(name, {})


def _x(shape=SHAPE, seed=0):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 - 1


@pytest.mark.parametrize("name", sorted(TASKS))
def test_registry_members_satisfy_protocol(name, mask_png):
    task = TASKS[name](**_example_params(name, mask_png))
    assert isinstance(task, Task) and task.name == name
    x = _x()
    m = task.measure(x, seed=5)
    assert isinstance(m, Measurement)
    assert isinstance(m.operator, LinearOperator)
    assert tuple(m.y.shape) == m.operator.output_shape(x.shape)
    assert m.seeds == [5, 6, 7] and m.x_shape == SHAPE
    assert torch.isfinite(m.y).all()
    # the measurement's operator has a true adjoint
    y = torch.randn(m.y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    lhs, rhs = (m.operator(x) * y).sum(), (x * m.operator.adjoint(y)).sum()
    assert float((lhs - rhs).abs()) < 1e-10 * float(m.operator(x).norm() * y.norm())
    # the noise is what the task says: y - A x has std sigma_y (Gaussian noise, default 0.05)
    if m.sigma_y:
        resid = m.y - m.operator(x)
        assert abs(float(resid.std()) / m.sigma_y - 1) < 5 / math.sqrt(2 * resid.numel())
    # rebuilding the operator from the seed gives the same one
    again = task.build_operator(SHAPE, seed=5)
    assert torch.equal(again(x), m.operator(x))
    # every default can be overridden by name, and the full parameter set is recorded
    assert set(task.params) == set(task_parameters(name))


@pytest.mark.parametrize("name,params", [
    ("motion_blur", {"kernel_size": 9}),
    ("random_inpainting", {"drop": [0.3, 0.7]}),
    ("box_inpainting", {"box_size": 8, "position": "random", "margin": 2}),
    ("freeform_inpainting", {}),
    ("gaussian_blur", {"kernel_size": 5}),
])
def test_image_i_depends_only_on_its_seed(name, params):
    task = make_task(name, **params)
    x = _x()
    batch = task.measure(x, seed=100)
    for i in range(3):
        single = task.measure(x[i:i + 1], seed=100 + i)
        assert torch.equal(batch.y[i:i + 1], single.y), i
    listed = task.measure(x[[1, 0]], seed=[101, 100])
    assert torch.equal(listed.y[0], batch.y[1]) and torch.equal(listed.y[1], batch.y[0])
    other = task.measure(x, seed=7)
    assert not torch.equal(other.y, batch.y)


def test_measurement_same_in_float32_up_to_rounding():
    task = make_task("random_inpainting", drop=0.5)
    x = _x()
    a = task.measure(x, seed=3).y
    b = task.measure(x.float(), seed=3).y
    assert b.dtype == torch.float32
    assert torch.allclose(a.float(), b, atol=1e-6)


def test_motion_blur_shared_kernel_seed():
    task = make_task("motion_blur", kernel_size=9, kernel_seed=4)
    assert not task.is_random
    m = task.measure(_x(), seed=0)
    assert m.operator.kernel.shape[0] == 1


def test_registry_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown task 'deblur'; known tasks:"):
        make_task("deblur")
    with pytest.raises(ValueError, match="unknown parameter.*'sigma'.*accepted:"):
        make_task("gaussian_blur", sigma=3.0)
    with pytest.raises(ValueError, match="needs parameter\\(s\\) mask_path"):
        make_task("mask_inpainting")
    with pytest.raises(ValueError, match="sigma_y must be a finite non-negative"):
        make_task("denoising", sigma_y=-0.1)
    with pytest.raises(ValueError, match="odd"):
        make_task("gaussian_blur", kernel_size=60)
    with pytest.raises(FileNotFoundError, match="nomask.png"):
        make_task("mask_inpainting", mask_path=str(tmp_path / "nomask.png"))
    task = make_task("super_resolution", scale=4)
    with pytest.raises(ValueError, match="scale 4 does not divide the image size 37x31"):
        task.measure(torch.zeros(1, 3, 37, 31))
    x = torch.zeros(1, 3, 8, 8)
    x[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        task.measure(x)


def test_mask_task_size_mismatch(mask_png):
    task = make_task("mask_inpainting", mask_path=str(mask_png))
    with pytest.raises(ValueError, match="is 40x36 but the image is 41x36"):
        task.measure(torch.zeros(1, 3, 41, 36))


def test_noise_scale_conversion_in_tasks():
    task = make_task("denoising", sigma_y=12.75, sigma_scale="0-255")
    assert task.noise.sigma == pytest.approx(0.1)
    assert make_task("denoising", noise="none").measure(_x(), seed=0).sigma_y == 0.0
    poisson = make_task("denoising", noise="poisson", poisson_rate=1.0).measure(_x(), seed=0)
    assert poisson.sigma_y is None and float(poisson.y.abs().max()) <= 1.0


# ---------------------------------------------------------------------- presets
def test_presets_match_published_protocols():
    assert {"dps-256", "psld-512", "stsl-512"} <= set(list_presets())
    dps = load_preset("dps-256")
    assert dps.image_size == 256
    expect = {
        "super_resolution_x4": ("super_resolution", {"scale": 4, "filter": "bicubic"}),
        "gaussian_blur": ("gaussian_blur", {"kernel_size": 61, "std": 3.0}),
        "motion_blur": ("motion_blur", {"kernel_size": 61, "intensity": 0.5}),
        "box_inpainting": ("box_inpainting", {"box_size": 128}),
        "random_inpainting": ("random_inpainting", {"drop": [0.3, 0.7]}),
    }
    for entry, (task, params) in expect.items():
        name, got = dps.params(entry)
        assert name == task and got["sigma_y"] == 0.05
        assert {k: got[k] for k in params} == params
    for pname in ("psld-512", "stsl-512"):
        p = load_preset(pname)
        assert p.image_size == 512
        assert p.params("super_resolution_x4")[1]["scale"] == 4
        assert p.params("super_resolution_x8")[1]["scale"] == 8
        assert p.params("gaussian_blur")[1]["kernel_size"] == 121
        assert p.params("motion_blur")[1]["kernel_size"] == 121
        assert p.params("motion_blur")[1]["intensity"] == 0.5
        assert p.params("box_inpainting")[1]["box_size"] == 256


def test_preset_task_builds_the_published_operator():
    task = load_preset("dps-256").task("gaussian_blur")
    assert task.label == "dps-256:gaussian_blur"
    op = task.build_operator((1, 3, 256, 256))
    assert isinstance(op, Blur) and op.padding == "reflect"
    assert torch.allclose(op.kernel[0], gaussian_kernel(61, 3.0, truncate=4.0))
    assert isinstance(task.noise, GaussianNoise) and task.noise.sigma == 0.05
    small = load_preset("dps-256").task("box_inpainting", box_size=8, margin=1)
    m = small.measure(_x((1, 3, 16, 16)), seed=0)
    assert int((m.operator.mask == 0).sum()) == 64
    with pytest.raises(ValueError, match="unknown preset 'dps-1024'"):
        load_preset("dps-1024")
    with pytest.raises(ValueError, match="has no task 'inpaint'"):
        load_preset("dps-256").task("inpaint")


# ---------------------------------------------------------------------- save / load
@pytest.mark.parametrize("name", ["motion_blur", "random_inpainting", "super_resolution", "denoising"])
def test_measurement_round_trip(tmp_path, name, mask_png):
    task = make_task(name, **_example_params(name, mask_png))
    x = _x()
    m = task.measure(x.float(), seed=11)
    path = tmp_path / "m.pt"
    m.save(path)
    back = load_measurement(path)
    assert torch.equal(back.y, m.y)
    assert back.task == name and back.seeds == [11, 12, 13] and back.params == m.params
    assert back.sigma_y == m.sigma_y
    assert torch.equal(back.operator(x), m.operator(x))
    # the stored seeds and parameters reproduce the same measurement from the clean image
    again = make_task(back.task, **back.params).measure(x.float(), seed=back.seeds)
    assert torch.equal(again.y, m.y)
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        m.save(path)
    m.save(path, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temporary files left behind


def test_load_measurement_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        load_measurement(tmp_path / "nothing.pt")
    torch.save({"a": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a hessdiff measurement"):
        load_measurement(tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="cannot read a measurement"):
        load_measurement(tmp_path / "junk.pt")


def test_custom_task_with_matrix_operator():
    a = torch.randn(2, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    task = Task("gmm", MatrixOperator(a), GaussianNoise(0.01))
    x = torch.randn(5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    m = task.measure(x, seed=0)
    assert m.y.shape == (5, 2)
    assert float((m.y - x @ a.T).abs().max()) < 0.1


# ---------------------------------------------------------------------- deepinv
def test_as_operator():
    op = SuperResolution(2)
    assert as_operator(op) is op
    assert isinstance(as_operator(torch.ones(2, 3)), MatrixOperator)
    with pytest.raises(ValueError, match="cannot use a str"):
        as_operator("blur")


def test_deepinv_physics_as_operator():
    dinv = pytest.importorskip("deepinv")
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(1, 1, 37, 31, generator=g) > 0.4).double()
    physics = dinv.physics.Inpainting(img_size=(3, 37, 31), mask=mask)
    op = from_deepinv(physics)
    x = torch.randn(3, 3, 37, 31, generator=g, dtype=torch.float64)
    y = torch.randn(3, 3, 37, 31, generator=g, dtype=torch.float64)
    assert torch.allclose(op(x), Inpainting(mask[0])(x))
    lhs, rhs = (op(x) * y).sum(), (x * op.adjoint(y)).sum()
    assert float((lhs - rhs).abs() / lhs.abs()) < 1e-10
    assert op.output_shape(x.shape) == x.shape
    assert torch.allclose(op(op.pinv(op(x))), op(x), atol=1e-8)
    blur = from_deepinv(dinv.physics.BlurFFT(img_size=(3, 37, 31), filter=gaussian_kernel(9, 2.0)[None, None]))
    lhs, rhs = (blur(x) * y).sum(), (x * blur.adjoint(y)).sum()
    assert float((lhs - rhs).abs() / lhs.abs()) < 1e-10
    # a float32 physics with float32 images (shapes are probed in the argument's dtype)
    blur32 = from_deepinv(dinv.physics.Blur(filter=gaussian_kernel(5, 1.0)[None, None].float(), padding="circular"))
    x32, y32 = x.float(), y.float()
    assert blur32(x32).dtype == torch.float32
    lhs, rhs = (blur32(x32).double() * y32.double()).sum(), (x32.double() * blur32.adjoint(y32).double()).sum()
    assert float((lhs - rhs).abs() / lhs.abs()) < 1e-5
    # a task can use a deepinv operator directly
    m = Task("deepinv-inpainting", as_operator(physics), GaussianNoise(0.05)).measure(x, seed=0)
    assert m.y.shape == x.shape


def test_hessdiff_operator_as_deepinv_physics():
    pytest.importorskip("deepinv")
    op = Blur(gaussian_kernel(7, 1.5), "reflect")
    physics = to_deepinv(op)
    x = torch.randn(2, 3, 37, 31, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert torch.equal(physics.A(x), op(x))
    assert torch.equal(physics.A_adjoint(x), op.adjoint(x))
    assert abs(float(physics.adjointness_test(x))) < 1e-10
