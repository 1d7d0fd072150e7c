"""GaLore+'s sparsely coded residual (``residual_density``): the engine against the update written out on small
matrices, its support, memory and validation."""

from __future__ import annotations

import math

import pytest
import torch

import svdkit
import svdkit.optim as O
from svdkit.optim import projection as proj


pytestmark = pytest.mark.usefixtures("one_thread")


def _top_left(X, r):
    U = torch.linalg.svd(X.double(), full_matrices=False)[0][:, :r]
    return U.float()  # signs do not matter: P → P·diag(±1) leaves P N and P Pᵀ unchanged


def reference(W, grads, r, T, scale, lr, density, b1=0.9, b2=0.999, eps=1e-8):
    """GaLore (on_switch="reset") plus the residual E = X − P Pᵀ X trained by Adam on Ω, the top-k |E| entries
    at each refresh (k = ⌈density·s·L⌉), moments restarted at each refresh: W −= lr·scale·(P N + scatter_Ω(n_e))."""
    W = W.clone()
    transposed = W.shape[0] > W.shape[1]
    for step, G in enumerate(grads):
        X = G.T if transposed else G
        s, L = X.shape
        if step % T == 0:
            P = _top_left(X, r)
            m, v, t = torch.zeros(r, L), torch.zeros(r, L), 0
            E = X - P @ P.T @ X
            k = math.ceil(density * s * L)
            omega = torch.topk(E.abs().flatten(), k).indices
            me, ve, te = torch.zeros(k), torch.zeros(k), 0
        R = P.T @ X
        t += 1
        m, v = b1 * m + (1 - b1) * R, b2 * v + (1 - b2) * R * R
        N = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
        e = (X - P @ R).flatten()[omega]
        te += 1
        me, ve = b1 * me + (1 - b1) * e, b2 * ve + (1 - b2) * e * e
        D = torch.zeros(s * L)
        D[omega] = (me / (1 - b1**te)) / ((ve / (1 - b2**te)).sqrt() + eps)
        U = scale * (P @ N + D.view(s, L))
        W = W - lr * (U.T if transposed else U)
    return W


@pytest.mark.parametrize("shape", [(6, 10), (10, 6)])
@pytest.mark.parametrize("density", [0.15, 1.0])
def test_residual_matches_the_written_out_update(shape, density):
    W0 = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(4)
    grads = [torch.randn(*shape, generator=g) for _ in range(7)]
    W = torch.nn.Parameter(W0.clone())
    opt = O.GaLoreAdamW([W], lr=0.05, rank=2, update_gap=3, scale=0.5, residual_density=density)
    for G in grads:
        W.grad = G.clone()
        opt.step()
    torch.testing.assert_close(W.detach(), reference(W0, grads, 2, 3, 0.5, 0.05, density), rtol=1e-4, atol=1e-5)
    assert opt.state[W]["res_idx"].numel() == math.ceil(density * 60) and opt.state[W]["res_step"] == 1  # refreshed at step 6


def test_residual_entries_without_forming_the_residual():
    X, P = torch.randn(7, 11), torch.linalg.qr(torch.randn(7, 3)).Q
    R = P.T @ X
    idx = torch.tensor([0, 5, 20, 76])
    torch.testing.assert_close(proj.residual_at(X, P, R, idx), (X - P @ R).flatten()[idx], rtol=1e-5, atol=1e-6)
    support = proj.residual_support(X, P, 0.1)
    E = (X - P @ R).abs().flatten()
    assert support.numel() == 8 and E[support].min() >= E[~torch.isin(torch.arange(77), support)].max()


def test_first_step_is_scaled_signs_of_the_projected_gradient_and_of_the_residual():
    # Adam's first step is g / (|g| + ε) ≈ sign(g); with density 1 every residual entry is on Ω:
    # W₁ = −lr · scale · (P sign(Pᵀ X) + sign(X − P Pᵀ X))
    X = torch.randn(8, 12)
    W = torch.nn.Parameter(torch.zeros(8, 12))
    opt = O.GaLoreAdamW([W], lr=1.0, rank=2, scale=0.5, residual_density=1.0)
    W.grad = X
    opt.step()
    P = opt.state[W]["proj"]
    expected = -0.5 * (P @ torch.sign(P.T @ X) + torch.sign(X - P @ P.T @ X))
    torch.testing.assert_close(W.detach(), expected, rtol=1e-4, atol=1e-5)


def test_galore_plus_defaults_and_memory():
    cfg = svdkit.config("galore-plus")
    assert cfg.residual_density == 0.01 and svdkit.config("galore").residual_density == 0.0
    W = torch.nn.Parameter(torch.zeros(40, 50))
    with_res = O.build([W], cfg.__class__(rank=4), lr=1e-3)
    W2 = torch.nn.Parameter(torch.zeros(40, 50))
    without = O.build([W2], cfg.__class__(rank=4, residual_density=0.0), lr=1e-3)
    W.grad = W2.grad = torch.randn(40, 50)
    with_res.step()
    without.step()
    assert O.state_bytes(with_res) - O.state_bytes(without) == 20 * 16  # 1 % of 2000 entries, 8 + 4 + 4 bytes each


def test_invalid_density_and_online_pca_are_refused():
    with pytest.raises(ValueError, match="residual_density must be in"):
        svdkit.config("galore-plus", residual_density=1.5)
    with pytest.raises(ValueError, match="online-pca"):
        svdkit.config("osd", residual_density=0.01)
