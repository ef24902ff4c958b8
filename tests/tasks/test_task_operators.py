"""Operators: adjointness, pseudo-inverse identities, parity with scipy / torch / documented formulas, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hessdiff.tasks import (
    Blur,
    Compose,
    Identity,
    Inpainting,
    MatrixOperator,
    SuperResolution,
    cgls,
    gaussian_kernel,
    motion_blur_kernel,
    operator_from_config,
    resize_matrix,
)

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
B, C, H, W = 3, 3, 37, 31  # odd sizes, batch > 1


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rand(shape, dtype, seed):
    return torch.randn(shape, generator=_gen(seed), dtype=torch.float64).to(dtype)


def _sr_shape(scale: int) -> tuple[int, int, int, int]:
    # odd multiples of the scale: the low-resolution image is odd-sized too
    return (B, C, scale * 9, scale * 7)


def _operators() -> list[tuple[str, object, tuple[int, ...]]]:
    g = _gen(0)
    ops: list[tuple[str, object, tuple[int, ...]]] = [("identity", Identity(), (B, C, H, W))]
    for pad in ("reflect", "circular", "zero", "replicate"):
        for method in ("direct", "fft"):
            ops.append((f"gauss9-{pad}-{method}", Blur(gaussian_kernel(9, 2.0), pad, method), (B, C, H, W)))
        # a non-symmetric kernel catches a missing flip in the adjoint
        ops.append((f"motion15-{pad}", Blur(motion_blur_kernel(15, 0.5, _gen(1)), pad, "direct"), (B, C, H, W)))
        ops.append((f"perimage-{pad}", Blur(torch.rand(B, 5, 7, generator=g, dtype=torch.float64), pad, "direct"),
                    (B, C, H, W)))
    # kernel as large as the paper's (61x61) on a 37x31 image: reflect needs 30 < 31, fine; circular wraps
    ops.append(("gauss61-reflect-fft", Blur(gaussian_kernel(61, 3.0), "reflect", "fft"), (B, C, H, W)))
    ops.append(("gauss61-circular", Blur(gaussian_kernel(61, 3.0), "circular"), (B, C, H, W)))
    ops.append(("gauss61-zero", Blur(gaussian_kernel(61, 3.0), "zero"), (B, C, H, W)))
    # kernel larger than the image: circular wraps it around, zero padding just pads more
    ops.append(("motion61-circular-small", Blur(motion_blur_kernel(61, 0.5, _gen(2)), "circular"), (B, C, 13, 11)))
    ops.append(("motion61-zero-small", Blur(motion_blur_kernel(61, 0.5, _gen(2)), "zero"), (B, C, 13, 11)))
    for scale in (2, 4, 8):
        for filt, bnd in (("bicubic", "reflect"), ("bicubic", "truncate"), ("average", "reflect")):
            ops.append((f"sr{scale}-{filt}-{bnd}", SuperResolution(scale, filt, bnd), _sr_shape(scale)))
    ops.append(("mask-shared", Inpainting((torch.rand(1, H, W, generator=g) > 0.5).double()), (B, C, H, W)))
    ops.append(("mask-perimage-perchannel", Inpainting((torch.rand(B, C, H, W, generator=g) > 0.3).double()),
                (B, C, H, W)))
    ops.append(("mask-soft", Inpainting(torch.rand(H, W, generator=g, dtype=torch.float64)), (B, C, H, W)))
    ops.append(("matrix", MatrixOperator(torch.randn(4, 8, generator=g, dtype=torch.float64)), (B, 8)))
    ops.append(("matrix-image", MatrixOperator(torch.randn(5, 2 * 5 * 3, generator=g, dtype=torch.float64),
                                               in_shape=(2, 5, 3)), (B, 2, 5, 3)))
    ops.append(("compose-sr-blur", SuperResolution(2) @ Blur(gaussian_kernel(7, 1.5), "reflect"), (B, C, 38, 30)))
    ops.append(("compose-mask-blur-sr", Compose(Inpainting(torch.ones(1, 19, 15)), SuperResolution(2, "average"),
                                                Blur(gaussian_kernel(5, 1.0), "circular")), (B, C, 38, 30)))
    return ops


OPERATORS = _operators()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name,op,shape", OPERATORS, ids=[o[0] for o in OPERATORS])
def test_adjointness(name, op, shape, dtype):
    x = _rand(shape, dtype, 1)
    ax = op(x)
    assert ax.dtype == dtype
    assert tuple(ax.shape) == op.output_shape(shape)
    # y = A x + noise keeps <Ax, y> well away from 0, so the relative error |lhs - rhs| / |lhs| is
    # meaningful (for an independent random y the inner product can nearly cancel)
    y = ax + _rand(ax.shape, dtype, 2) * ax.double().std().to(dtype)
    aty = op.adjoint(y)
    assert tuple(aty.shape) == tuple(shape) == op.input_shape(y.shape)
    lhs = (ax.double() * y.double()).sum()
    rhs = (x.double() * aty.double()).sum()
    assert float((lhs - rhs).abs() / lhs.abs()) < TOL[dtype]


@pytest.mark.parametrize("name,op,shape", OPERATORS, ids=[o[0] for o in OPERATORS])
def test_pinv_identities(name, op, shape):
    """A A⁺ A = A and A⁺ A A⁺ = A⁺ where a closed form is claimed; a clear error otherwise."""
    x = _rand(shape, torch.float64, 3)
    y = op(x)
    if not op.has_pinv:
        with pytest.raises(NotImplementedError, match="pinv_cg"):
            op.pinv(y)
        return
    rel = 1e-6 if isinstance(op, Blur) else 1e-10  # circular blur: frequencies below rcond=1e-6 are dropped
    aapa = op(op.pinv(y))
    assert float((aapa - y).norm() / y.norm()) < rel
    z = _rand(y.shape, torch.float64, 4)
    pz = op.pinv(z)
    assert float((op.pinv(op(pz)) - pz).norm() / pz.norm()) < rel


def test_circular_blur_pinv_is_exact_inverse_for_invertible_kernel():
    k = torch.zeros(3, 3, dtype=torch.float64)
    k[1, 1], k[0, 1], k[2, 2] = 1.0, 0.2, 0.1  # transfer function bounded away from 0
    op = Blur(k, "circular")
    x = _rand((2, 1, 9, 11), torch.float64, 5)
    assert torch.allclose(op.pinv(op(x)), x, atol=1e-12)


def test_sr_pinv_matches_dense_pseudo_inverse():
    op = SuperResolution(2)
    shape = (1, 1, 6, 4)
    n = math.prod(shape)
    dense = torch.stack([op(e.view(shape)).flatten() for e in torch.eye(n, dtype=torch.float64)], 1)
    y = _rand((1, 1, 3, 2), torch.float64, 6)
    ref = (torch.linalg.pinv(dense) @ y.flatten()).view(shape)
    assert torch.allclose(op.pinv(y), ref, atol=1e-12)


def test_cgls_matches_closed_form_pinv():
    g = _gen(7)
    mat = MatrixOperator(torch.randn(5, 12, generator=g, dtype=torch.float64))
    y = torch.randn(3, 5, generator=g, dtype=torch.float64)
    assert torch.allclose(mat.pinv_cg(y, max_iter=50, tol=1e-14), mat.pinv(y), atol=1e-10)
    sr = SuperResolution(4)
    ysr = _rand((2, 3, 5, 4), torch.float64, 8)
    assert torch.allclose(cgls(sr, ysr, max_iter=200, tol=1e-13), sr.pinv(ysr), atol=1e-8)


def test_cgls_gives_pseudo_inverse_for_reflect_blur():
    """No closed form for reflect padding: CGLS converges to the dense pseudo-inverse solution."""
    op = Blur(gaussian_kernel(3, 0.6), "reflect")
    shape = (1, 1, 9, 7)
    n = math.prod(shape)
    dense = torch.stack([op(e.view(shape)).flatten() for e in torch.eye(n, dtype=torch.float64)], 1)
    y = _rand(shape, torch.float64, 9)
    ref = (torch.linalg.pinv(dense) @ y.flatten()).view(shape)
    x = op.pinv_cg(y, max_iter=200, tol=1e-13)
    assert float((x - ref).norm() / ref.norm()) < 1e-9


# ---------------------------------------------------------------------- parity
def _scipy_ndimage():
    return pytest.importorskip("scipy.ndimage")


@pytest.mark.parametrize("padding,mode", [("reflect", "mirror"), ("circular", "wrap"), ("zero", "constant"),
                                          ("replicate", "nearest")])
@pytest.mark.parametrize("method", ["direct", "fft"])
def test_gaussian_blur_matches_scipy(padding, mode, method):
    ndi = _scipy_ndimage()
    size, std = 11, 2.0
    x = _rand((2, 3, 37, 31), torch.float64, 10)
    ours = Blur(gaussian_kernel(size, std), padding, method)(x)
    trunc = (size // 2) / std  # scipy's radius int(truncate*std + 0.5) == size // 2
    ref = np.stack([[ndi.gaussian_filter(x[b, c].numpy(), std, mode=mode, truncate=trunc) for c in range(3)]
                    for b in range(2)])
    assert np.abs(ours.numpy() - ref).max() < 1e-12


def test_blur_is_correlation_matching_scipy_for_asymmetric_kernel():
    ndi = _scipy_ndimage()
    k = motion_blur_kernel(9, 0.8, _gen(11))
    x = _rand((1, 1, 20, 17), torch.float64, 12)
    ours = Blur(k, "reflect", "direct")(x)[0, 0].numpy()
    ref = ndi.correlate(x[0, 0].numpy(), k.numpy(), mode="mirror")
    assert np.abs(ours - ref).max() < 1e-12


def test_gaussian_kernel_matches_scipy_impulse_response_and_formula():
    ndi = _scipy_ndimage()
    for size, std in ((61, 3.0), (121, 3.0), (9, 0.7)):
        impulse = np.zeros((size, size))
        impulse[size // 2, size // 2] = 1.0
        ref = ndi.gaussian_filter(impulse, sigma=std)  # what the DPS / PSLD code builds (truncate=4)
        assert np.abs(gaussian_kernel(size, std, truncate=4.0).numpy() - ref).max() < 1e-15
    k = gaussian_kernel(7, 1.3)
    r = np.arange(7) - 3
    formula = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * 1.3**2))
    assert np.abs(k.numpy() - formula / formula.sum()).max() < 1e-15
    assert abs(float(k.sum()) - 1) < 1e-15


def test_fft_and_direct_blur_agree():
    x = _rand((3, 2, 37, 31), torch.float64, 13)
    ks = torch.stack([motion_blur_kernel(21, 0.5, _gen(s)) for s in range(3)])
    for pad in ("reflect", "circular", "zero"):
        a = Blur(ks, pad, "direct")(x)
        b = Blur(ks, pad, "fft")(x)
        assert torch.allclose(a, b, atol=1e-13)


def test_per_image_kernels_equal_separate_operators():
    x = _rand((3, 3, 24, 19), torch.float64, 14)
    ks = torch.stack([gaussian_kernel(7, s) for s in (0.5, 1.0, 2.0)])
    batched = Blur(ks, "reflect")(x)
    for i in range(3):
        assert torch.allclose(batched[i:i + 1], Blur(ks[i], "reflect")(x[i:i + 1]), atol=1e-14)


def _bicubic_oracle(x: np.ndarray, s: int, boundary: str) -> np.ndarray:
    """Direct per-pixel evaluation of the documented formula (Keys a=-0.5, width scaled by s)."""

    def keys(t: float) -> float:
        t = abs(t)
        if t <= 1:
            return 1.5 * t**3 - 2.5 * t**2 + 1
        if t < 2:
            return -0.5 * t**3 + 2.5 * t**2 - 4 * t + 2
        return 0.0

    def resize_axis(v: np.ndarray) -> np.ndarray:
        n = v.shape[0]
        out = np.zeros((n // s,) + v.shape[1:])
        for i in range(n // s):
            u = (i + 0.5) * s - 0.5  # output pixel centre on the input grid
            acc, wsum = 0.0, 0.0
            for j in range(int(math.floor(u - 2 * s)) - 1, int(math.ceil(u + 2 * s)) + 2):
                wt = keys((j - u) / s)
                if boundary == "truncate" and not 0 <= j < n:
                    continue
                jj = j
                while not 0 <= jj < n:  # half-sample symmetric reflection
                    jj = -jj - 1 if jj < 0 else 2 * n - 1 - jj
                acc = acc + wt * v[jj]
                wsum += wt
            out[i] = acc / wsum
        return out

    return resize_axis(resize_axis(x).T).T


@pytest.mark.parametrize("boundary", ["reflect", "truncate"])
@pytest.mark.parametrize("scale", [2, 4, 8])
def test_bicubic_matches_documented_formula(scale, boundary):
    x = _rand((1, 1, 3 * scale, 5 * scale), torch.float64, 15)
    ours = SuperResolution(scale, "bicubic", boundary)(x)[0, 0].numpy()
    ref = _bicubic_oracle(x[0, 0].numpy(), scale, boundary)
    assert np.abs(ours - ref).max() < 1e-13


@pytest.mark.parametrize("scale", [2, 4, 8])
def test_bicubic_parity_with_torch_antialias(scale):
    """torch's antialiased bicubic = ours with boundary='truncate' everywhere; the DPS rule ('reflect')
    agrees on the interior and differs only within 2·scale input pixels of the border (taps beyond
    the edge are reflected there instead of dropped and renormalised)."""
    x = _rand((2, 3, 9 * scale, 7 * scale), torch.float64, 16)
    ref = F.interpolate(x, scale_factor=1 / scale, mode="bicubic", antialias=True, align_corners=False)
    assert torch.allclose(SuperResolution(scale, boundary="truncate")(x), ref, atol=1e-13)
    dps = SuperResolution(scale, boundary="reflect")(x)
    assert torch.allclose(dps[..., 2:-2, 2:-2], ref[..., 2:-2, 2:-2], atol=1e-13)
    assert float((dps - ref).abs().max()) > 1e-3  # they genuinely differ at the border


def test_bicubic_parity_with_pil():
    from PIL import Image

    x = _rand((1, 1, 48, 40), torch.float64, 17)
    im = Image.fromarray(x[0, 0].numpy().astype(np.float32), mode="F")
    ref = np.asarray(im.resize((10, 12), Image.Resampling.BICUBIC), dtype=np.float64)
    ours = SuperResolution(4, boundary="truncate")(x)[0, 0].numpy()
    assert np.abs(ours - ref).max() < 1e-5  # PIL computes in float32


def test_average_pool_matches_avg_pool2d_and_bicubic_preserves_constants():
    x = _rand((2, 3, 36, 28), torch.float64, 18)
    assert torch.allclose(SuperResolution(4, "average")(x), F.avg_pool2d(x, 4), atol=1e-14)
    const = torch.full((1, 1, 40, 24), 0.3, dtype=torch.float64)
    for bnd in ("reflect", "truncate"):
        assert torch.allclose(SuperResolution(8, "bicubic", bnd)(const), torch.full((1, 1, 5, 3), 0.3,
                                                                                     dtype=torch.float64))
    w = resize_matrix(28, 4)
    assert torch.allclose(w.sum(1), torch.ones(7, dtype=torch.float64))


def test_matrix_operator_conventions():
    g = _gen(19)
    a = torch.randn(3, 6, generator=g, dtype=torch.float64)
    op = MatrixOperator(a)
    x = torch.randn(4, 6, generator=g, dtype=torch.float64)
    y = torch.randn(4, 3, generator=g, dtype=torch.float64)
    assert torch.allclose(op(x), x @ a.T)
    assert torch.allclose(op.adjoint(y), y @ a)
    assert torch.allclose(op.pinv(y), y @ torch.linalg.pinv(a).T)


@pytest.mark.parametrize("method", ["direct", "fft"])
def test_autograd_gradient_is_adjoint_of_residual(method):
    op = Blur(motion_blur_kernel(9, 0.5, _gen(20)), "reflect", method) @ Inpainting(torch.ones(1, 16, 14))
    x = _rand((2, 3, 16, 14), torch.float64, 21).requires_grad_(True)
    y = _rand((2, 3, 16, 14), torch.float64, 22)
    loss = 0.5 * ((op(x) - y) ** 2).sum()
    (grad,) = torch.autograd.grad(loss, x)
    assert torch.allclose(grad, op.adjoint(op(x.detach()) - y), atol=1e-12)


def test_config_round_trip():
    for name, op, shape in OPERATORS:
        rebuilt = operator_from_config(op.get_config())
        x = _rand(shape, torch.float64, 23)
        assert torch.equal(rebuilt(x), op(x)), name


# ---------------------------------------------------------------------- errors
def test_nan_and_inf_rejected():
    op = Blur(gaussian_kernel(5, 1.0))
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        op(x)
    y = torch.zeros(1, 1, 8, 8)
    y[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        op.adjoint(y)
    with pytest.raises(ValueError, match="NaN or Inf"):
        SuperResolution(2).pinv(torch.full((1, 1, 2, 2), float("nan")))
    with pytest.raises(ValueError, match="NaN or Inf"):
        Blur(torch.tensor([[float("nan")]]))
    with pytest.raises(ValueError, match="floating-point"):
        op(torch.zeros(1, 1, 8, 8, dtype=torch.long))


def test_shape_errors():
    with pytest.raises(ValueError, match="mask size 8x8 does not match image size 9x8"):
        Inpainting(torch.ones(8, 8))(torch.zeros(1, 3, 9, 8))
    with pytest.raises(ValueError, match="mask has 3 channels but the image has 1"):
        Inpainting(torch.ones(3, 8, 8))(torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="per-image masks but the batch has 3"):
        Inpainting(torch.ones(2, 1, 8, 8))(torch.zeros(3, 1, 8, 8))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        Blur(gaussian_kernel(3, 1.0))(torch.zeros(8, 8))
    with pytest.raises(ValueError, match="scale 4 does not divide the image size 37x31"):
        SuperResolution(4)(torch.zeros(1, 3, 37, 31))
    with pytest.raises(ValueError, match=r"input must be \[B, 6\]"):
        MatrixOperator(torch.ones(2, 6))(torch.zeros(1, 5))
    with pytest.raises(ValueError, match=r"measurement must be \[B, 2\]"):
        MatrixOperator(torch.ones(2, 6)).adjoint(torch.zeros(1, 3))


def test_kernel_errors():
    with pytest.raises(ValueError, match="odd"):
        Blur(torch.ones(4, 5))
    with pytest.raises(ValueError, match="odd"):
        gaussian_kernel(60, 3.0)
    with pytest.raises(ValueError, match="std must be a positive"):
        gaussian_kernel(7, -1.0)
    with pytest.raises(ValueError, match="reflect padding needs the kernel half-size"):
        Blur(gaussian_kernel(61, 3.0), "reflect")(torch.zeros(1, 1, 30, 40))
    with pytest.raises(ValueError, match="unknown padding"):
        Blur(gaussian_kernel(3, 1.0), "mirror")
    # circular and zero padding accept a kernel larger than the image
    big = Blur(gaussian_kernel(61, 3.0), "circular")
    assert big(torch.zeros(1, 1, 30, 40)).shape == (1, 1, 30, 40)


def test_sr_constructor_errors():
    with pytest.raises(ValueError, match="positive integer"):
        SuperResolution(2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown filter"):
        SuperResolution(2, "lanczos")


def test_operator_follows_input_dtype_and_device():
    op = Blur(gaussian_kernel(5, 1.0)).to("cpu")
    for dtype in (torch.float32, torch.float64):
        x = torch.zeros(1, 1, 8, 8, dtype=dtype)
        assert op(x).dtype == dtype and op.adjoint(x).dtype == dtype


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_matches_cpu():
    for name, op, shape in OPERATORS:
        x = _rand(shape, torch.float64, 24)
        y = _rand(op.output_shape(shape), torch.float64, 25)
        opg = operator_from_config(op.get_config()).to("cuda")
        assert torch.allclose(opg(x.cuda()).cpu(), op(x), atol=1e-10), name
        assert torch.allclose(opg.adjoint(y.cuda()).cpu(), op.adjoint(y), atol=1e-10), name
