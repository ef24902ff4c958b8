"""Low-rank symmetric operators: eigen-form algebra, Woodbury, Nystrom and Lanczos against dense float64."""

import pytest
import torch

from hessdiff.samplers.lml.lowrank import (
    LowRankSym,
    lanczos,
    lowrank_eig,
    nystrom,
    random_probes,
    sherman_morrison_solve,
    woodbury_solve,
)

B, D, K = 3, 11, 4


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random_form(seed: int = 0) -> LowRankSym:
    g = _gen(seed)
    Q, _ = torch.linalg.qr(torch.randn(B, D, K, generator=g, dtype=torch.float64))
    s = torch.rand(B, K, generator=g, dtype=torch.float64) * 3 + 0.1
    s0 = torch.rand(B, generator=g, dtype=torch.float64) + 0.5
    return LowRankSym(Q, s, s0)


def _dense_fn(M: torch.Tensor, fn) -> torch.Tensor:
    e, V = torch.linalg.eigh(M)
    return (V * fn(e)[:, None, :]) @ V.transpose(1, 2)


def test_spectral_functions_match_dense():
    S = _random_form()
    M = S.dense()
    v = torch.randn(B, D, generator=_gen(1), dtype=torch.float64)
    torch.testing.assert_close(S.matvec(v), (M @ v[..., None])[..., 0], rtol=1e-12, atol=1e-12)
    eye = torch.eye(D, dtype=torch.float64)
    torch.testing.assert_close(S.solve(v, 0.3), torch.linalg.solve(M + 0.3 * eye, v), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(S.sqrt_apply(v), (_dense_fn(M, torch.sqrt) @ v[..., None])[..., 0], rtol=1e-10,
                               atol=1e-12)
    torch.testing.assert_close(S.inv_sqrt_apply(v), (_dense_fn(M, torch.rsqrt) @ v[..., None])[..., 0], rtol=1e-10,
                               atol=1e-12)
    # square root squared is the operator
    torch.testing.assert_close(S.sqrt_apply(S.sqrt_apply(v)), S.matvec(v), rtol=1e-10, atol=1e-12)


def test_solve_and_sqrt_reject_bad_spectra():
    S = _random_form()
    neg = LowRankSym(S.U, -S.s, S.s0)
    with pytest.raises(ValueError, match="positive definite"):
        neg.solve(torch.ones(B, D, dtype=torch.float64))
    with pytest.raises(ValueError, match="negative eigenvalue"):
        neg.sqrt_apply(torch.ones(B, D, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\[B=3, d=11\]"):
        S.matvec(torch.ones(B, D + 1, dtype=torch.float64))


def test_lowrank_eig_and_woodbury():
    g = _gen(2)
    V = torch.randn(B, D, K, generator=g, dtype=torch.float64)
    E = lowrank_eig(V)
    torch.testing.assert_close(E.dense(), V @ V.transpose(1, 2), rtol=1e-10, atol=1e-10)
    # linearly dependent columns become zero columns, not garbage
    Vd = torch.cat([V[:, :, :2], V[:, :, :1] * 2.0], 2)
    Ed = lowrank_eig(Vd)
    torch.testing.assert_close(Ed.dense(), Vd @ Vd.transpose(1, 2), rtol=1e-10, atol=1e-10)
    assert int((Ed.U.norm(dim=1) > 0.5).sum(1).max()) == 2
    b = torch.randn(B, D, generator=g, dtype=torch.float64)
    dense = 0.7 * torch.eye(D, dtype=torch.float64) + V @ V.transpose(1, 2)
    torch.testing.assert_close(woodbury_solve(0.7, V, b), torch.linalg.solve(dense, b), rtol=1e-10, atol=1e-12)
    u = V[:, :, 0]
    ref = 0.7 * torch.linalg.solve(0.7 * torch.eye(D, dtype=torch.float64) + u[:, :, None] * u[:, None, :], b)
    torch.testing.assert_close(sherman_morrison_solve(0.7, u, b), ref, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="c > 0"):
        woodbury_solve(0.0, V, b)


def test_nystrom_is_exact_for_low_rank_psd_and_degrades_gracefully():
    g = _gen(3)
    F = torch.randn(B, D, 3, generator=g, dtype=torch.float64)
    A = F @ F.transpose(1, 2)  # rank 3 PSD
    Om = random_probes(B, D, K, generator=g)
    Y = A @ Om
    torch.testing.assert_close(nystrom(Om, Y).dense(), A, rtol=1e-8, atol=1e-8)
    # non-orthonormal probes give the same answer
    torch.testing.assert_close(nystrom(3.0 * Om + Om[:, :, :1], A @ (3.0 * Om + Om[:, :, :1])).dense(), A,
                               rtol=1e-7, atol=1e-7)
    # an indefinite core keeps only its positive part (no NaN, PSD result)
    Mi = torch.diag_embed(torch.tensor([2.0, -1.0] + [0.0] * (D - 2), dtype=torch.float64)).expand(B, D, D)
    P = torch.eye(D, dtype=torch.float64)[None, :, :2].expand(B, D, 2).contiguous()
    est = nystrom(P, Mi @ P)
    assert torch.isfinite(est.dense()).all()
    assert float(torch.linalg.eigvalsh(est.dense()).min()) > -1e-12
    torch.testing.assert_close(est.dense()[:, 0, 0], torch.full((B,), 2.0, dtype=torch.float64))


def test_lanczos_matrix_function_and_breakdown():
    g = _gen(4)
    # identity + rank 2: the Krylov space is 3-dimensional, so k = 6 breaks down (handled)
    F = torch.randn(B, D, 2, generator=g, dtype=torch.float64)
    A = 0.5 * torch.eye(D, dtype=torch.float64) + F @ F.transpose(1, 2)
    v = torch.randn(B, D, generator=g, dtype=torch.float64)
    calls = []

    def mv(q):
        calls.append(1)
        return (A @ q[..., None])[..., 0]

    for k in (3, 6):
        calls.clear()
        est = lanczos(mv, v, k, generator=_gen(5))
        assert len(calls) == k
        UtU = est.U.transpose(1, 2) @ est.U
        torch.testing.assert_close(UtU, torch.eye(k, dtype=torch.float64).expand(B, k, k), rtol=0, atol=1e-10)
        ref = (_dense_fn(A, torch.sqrt) @ v[..., None])[..., 0]
        torch.testing.assert_close(est.apply(v, torch.sqrt), ref, rtol=1e-9, atol=1e-9)
    # with too small a Krylov space the approximation is visibly inexact
    est1 = lanczos(mv, v, 1)
    ref = (_dense_fn(A, torch.sqrt) @ v[..., None])[..., 0]
    assert float((est1.apply(v, torch.sqrt) - ref).norm()) > 1e-3
    with pytest.raises(ValueError, match="1 <= k <= d"):
        lanczos(mv, v, D + 1)
