"""The fast numerical path behind svdkit.spectrum: the blocked lower-triangle Gram product, Gram eigenvalues
against svdvals (well- and ill-conditioned, fp32 and fp64, non-finite and overflowing input), the banded
KS scan of the power-law fit against a one-candidate-at-a-time loop, and the fit's precision floor."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import svdkit
from svdkit.core.linalg_spectrum import gram, gram_eigenvalues, lower_gram
from svdkit.inspection.esd import powerlaw_fit


def _randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _with_spectrum(S: torch.Tensor, m: int, n: int, seed: int = 0) -> torch.Tensor:
    q = S.numel()
    U = torch.linalg.qr(_randn(m, q, seed=seed)).Q
    V = torch.linalg.qr(_randn(n, q, seed=seed + 1)).Q
    return U @ torch.diag(S.double()) @ V.T


@pytest.mark.parametrize("shape", [(70, 33), (33, 70), (40, 40), (300, 5)])
@pytest.mark.parametrize("blocks", [None, 1, 3, 1000])
def test_lower_gram_is_the_lower_triangle_of_the_full_gram(shape, blocks):
    W = _randn(*shape, seed=1)
    full = W.T @ W if shape[0] >= shape[1] else W @ W.T
    G = lower_gram(W, blocks)
    assert G.shape == full.shape
    torch.testing.assert_close(G.tril(), full.tril(), rtol=1e-12, atol=1e-12)
    if blocks is None or blocks == 1:  # q < 256 (default) or one block: the plain product
        torch.testing.assert_close(G, full, rtol=1e-12, atol=1e-12)
    else:  # eigvalsh reads the lower triangle only; what lies right of the diagonal blocks is never computed
        _assert_zero_above_blocks(G, min(blocks, G.shape[0]))
    assert float(gram(W.float()).tril().sub(full.float().tril()).abs().max()) < 1e-4 * float(full.abs().max())


def test_lower_gram_default_blocks_skip_the_upper_triangle():
    W = _randn(300, 260, seed=7)  # q = 260: two 130-wide blocks
    G = lower_gram(W)
    torch.testing.assert_close(G.tril(), (W.T @ W).tril(), rtol=1e-12, atol=1e-10)
    _assert_zero_above_blocks(G, 2)


def _assert_zero_above_blocks(G, b):
    q = G.shape[0]
    edges = [round(i * q / b) for i in range(b + 1)]
    for lo, hi in zip(edges[:-1], edges[1:]):
        if hi < q:
            assert float(G[lo:hi, hi:].abs().max()) == 0.0


def test_gram_eigenvalues_match_svdvals_on_a_random_matrix():
    W = _randn(90, 40, seed=2)
    ref = torch.linalg.svdvals(W).square()
    for M in (W, W.T):
        lam = gram_eigenvalues(M)  # fp64
        assert lam.dtype == torch.float64 and lam.shape == (40,) and bool((lam[:-1] >= lam[1:]).all())
        torch.testing.assert_close(lam, ref, rtol=1e-12, atol=1e-12 * float(ref[0]))
        lam32 = gram_eigenvalues(M.float(), torch.float32)
        assert float((lam32 - ref).abs().max()) < 1e-5 * float(ref[0])


def test_gram_eigenvalues_of_an_ill_conditioned_matrix():
    """σ from 1 down to 1e-7 (κ = 1e7, κ² = 1e14): the error of λ is absolute, ~u·λ₁, so the large
    eigenvalues stay relatively exact and the smallest ones are resolved only in fp64."""
    S = torch.logspace(0, -7, 48, dtype=torch.float64)
    W = _with_spectrum(S, 120, 48, seed=3)
    ref = S.square()
    lam = gram_eigenvalues(W)
    assert float((lam - ref).abs().max()) < 1e-13  # λ₁ = 1
    big = ref > 1e-8
    torch.testing.assert_close(lam[big], ref[big], rtol=1e-4, atol=0)
    lam32 = gram_eigenvalues(W.float(), torch.float32)
    assert float((lam32 - ref).abs().max()) < 1e-5  # absolute, ≲ q·u₃₂·λ₁
    top = ref > 1e-2
    torch.testing.assert_close(lam32[top], ref[top], rtol=1e-4, atol=0)
    assert float(lam32.min()) >= 0.0  # round-off negatives are clamped


def test_gram_eigenvalues_refuse_non_finite_input_and_survive_fp32_overflow():
    W = _randn(20, 10, seed=4).float()
    bad = W.clone()
    bad[3, 4], bad[7, 1] = float("nan"), float("inf")
    with pytest.raises(ValueError, match="2 NaN/Inf entries"):
        gram_eigenvalues(bad, torch.float32)
    with pytest.raises(TypeError, match="float matrix"):
        gram_eigenvalues(torch.ones(4, 3, dtype=torch.int64))
    huge = W * 1e20  # finite in fp32, its squares (1e40) are not: recomputed in fp64
    lam = gram_eigenvalues(huge, torch.float32)
    ref = torch.linalg.svdvals(huge.double()).square()
    torch.testing.assert_close(lam, ref, rtol=1e-6, atol=0)
    net = nn.Sequential(nn.Linear(10, 20, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(bad)
    with pytest.raises(ValueError, match=r"^0: .*NaN/Inf"):  # the module is named
        svdkit.spectrum(net, progress=False)
    assert bool(torch.isnan(net[0].weight).any())  # input untouched


def _ks_loop(x):
    """WeightWatcher's KS scan written as its equations, one candidate x_min at a time: (D, α, x_min)."""
    x = sorted(float(v) for v in x)
    best = (2.0, None, None)
    for i in range(len(x) - 1):
        tail = x[i:]
        n = len(tail)
        s = sum(math.log(v / x[i]) for v in tail)
        alpha = 1 + n / s if s > 0 else math.inf
        D = max(abs(1 - (v / x[i]) ** (1 - alpha) - j / n) for j, v in enumerate(tail)) if 1 < alpha < math.inf else 1.0
        if D < best[0]:
            best = (D, alpha, x[i])
    return best


@pytest.mark.parametrize("N", [3, 4, 7, 13, 61])
def test_banded_ks_scan_matches_the_candidate_loop(N):
    g = torch.Generator().manual_seed(N)
    x = (1 - torch.rand(N, generator=g, dtype=torch.float64)) ** (-1 / 1.7)
    fit = powerlaw_fit(x)
    D, alpha, xmin = _ks_loop(x)
    assert fit["D"] == pytest.approx(D, rel=1e-10) and fit["alpha"] == pytest.approx(alpha, rel=1e-10)
    assert fit["xmin"] == pytest.approx(xmin, rel=1e-12)


@pytest.mark.parametrize("rank", [8, 40])
def test_rank_deficient_fp32_spectrum_fits_only_resolved_eigenvalues(rank):
    """A low-rank 96×80 weight (e.g. a dense export of a compressed model): in fp32 its zero eigenvalues come
    out as round-off of ~1e-9…1e-7·λ₁; the fit leaves out everything below q·u₃₂·λ₁ and matches the exact
    fit (without that floor, rank 8 gives α ≈ 1.17 fitted to the round-off)."""
    g = torch.Generator().manual_seed(5)
    lam = ((1 - torch.rand(rank, generator=g, dtype=torch.float64)) ** (-1 / 1.5)).sort(descending=True).values
    W = _with_spectrum(lam.sqrt(), 96, 80, seed=6)
    lin = nn.Linear(80, 96, bias=False)
    with torch.no_grad():
        lin.weight.copy_(W)
    exact = powerlaw_fit(lam)
    row32 = svdkit.spectrum(nn.Sequential(lin), progress=False)[0]
    row64 = svdkit.spectrum(nn.Sequential(lin), dtype=torch.float64, progress=False)[0]
    assert row64["alpha"] == pytest.approx(exact["alpha"], rel=1e-6)
    assert row32["alpha"] == pytest.approx(exact["alpha"], rel=1e-4) and row32["alpha_xmin"] >= float(lam.min()) * 0.99
