"""Every optim method's update rule written out on small matrices and compared with the optimizer: GaLore with
each basis (dct, random, randomized), Online Subspace Descent, Q-GaLore, SST and LOST (GaLore with the SVD
basis, on_switch and the residual: tests/test_optim.py, tests/test_optim_residual.py). The design example
(DESIGN.md §8: on_switch="keep") runs as written."""

from __future__ import annotations

import math

import pytest
import torch

import svdkit
import svdkit.optim as O
from svdkit.core.linalg import dct_matrix, layer_seed, svd_randomized
from svdkit.optim import projection as proj
from svdkit.optim.quant import fake_quantize
from svdkit.optim.sst import SSTAdamW, SSTLinear

from conftest import random_grads, tiny_model

B1, B2, EPS = 0.9, 0.999, 1e-8


pytestmark = pytest.mark.usefixtures("one_thread")




def _adam(state, g, key=""):
    """One Adam moment update; returns m̂ / (√v̂ + ε) (m by lerp, v by addcmul: the engine's op order, so that
    fake-quantized weights round the same way)."""
    t = state[key + "t"] = state.get(key + "t", 0) + 1
    state[key + "m"] = torch.lerp(state.get(key + "m", torch.zeros_like(g)), g, 1 - B1)
    state[key + "v"] = (state.get(key + "v", torch.zeros_like(g)) * B2).addcmul(g, g, value=1 - B2)
    return (state[key + "m"] / (1 - B1**t)) / ((state[key + "v"] / (1 - B2**t)).sqrt() + EPS)


def reference(W, grads, T, scale, lr, basis, lazy=None, weight_bits=None):
    """GaLore (on_switch="reset") with ``basis(X, refresh)`` → P; ``lazy`` = (threshold, queue): Q-GaLore's
    refresh gap doubles when the mean |cos| of first basis vectors over ``queue`` refreshes ≥ threshold;
    ``weight_bits``: W fake-quantized after each update (stochastic rounding, seed (0, "w0:step"))."""
    W, st, P, gap, nxt, cosines = W.clone(), {}, None, T, 0, []
    for step, G in enumerate(grads):
        X = G.T if W.shape[0] > W.shape[1] else G
        if step >= nxt:
            new = basis(X, st.get("refresh", 0))
            st = {"refresh": st.get("refresh", 0) + 1}
            if P is not None and lazy:
                cosines.append(float((P[:, 0] @ new[:, 0]).abs() / (P[:, 0].norm() * new[:, 0].norm())))
                if len(cosines) >= lazy[1]:
                    gap *= 2 if sum(cosines) / len(cosines) >= lazy[0] else 1
                    cosines = []
            P, nxt = new, step + gap
        U = (P @ _adam(st, P.T @ X)) * scale
        W = torch.add(W, U.T if W.shape[0] > W.shape[1] else U, alpha=-lr)
        if weight_bits:
            W = fake_quantize(W, weight_bits, 256, torch.Generator().manual_seed(layer_seed(0, f"w0:{step}")))
    return W


def _run(opt, W, grads):
    for G in grads:
        W.grad = G.clone()
        opt.step()
    return W.detach()


def _dct_basis(X, _refresh, r=3):
    D = dct_matrix(X.shape[0])
    return D[torch.topk((D @ X).abs().sum(1), r).indices].T


BASES = {
    "dct": _dct_basis,
    "random": lambda X, k: torch.linalg.qr(torch.randn(X.shape[0], 3, generator=torch.Generator().manual_seed(layer_seed(0, f"0:{k}")))).Q,
    "randomized": lambda X, k: svd_randomized(X, 3, [layer_seed(0, f"0:{k}")], niter=2)[0],
}  # fmt: skip


@pytest.mark.parametrize("projection", list(BASES))
@pytest.mark.parametrize("shape", [(6, 10), (10, 6)])
def test_each_basis_follows_the_galore_update(projection, shape):
    W0, grads = torch.randn(*shape), random_grads(shape, 7, 1)
    W = torch.nn.Parameter(W0.clone())
    opt = O.GaLoreAdamW([W], lr=0.05, rank=3, update_gap=3, scale=0.5, projection=projection)
    torch.testing.assert_close(_run(opt, W, grads), reference(W0, grads, 3, 0.5, 0.05, BASES[projection]), rtol=1e-4, atol=1e-5)


def test_random_basis_is_a_seeded_gaussian_q_and_changes_per_refresh():
    assert torch.equal(proj.random_basis(10, 3, 5), torch.linalg.qr(torch.randn(10, 3, generator=torch.Generator().manual_seed(5))).Q)
    assert not torch.allclose(BASES["random"](torch.zeros(10, 1), 0), BASES["random"](torch.zeros(10, 1), 1))


def test_q_galore_is_galore_with_quantized_projectors_lazy_gaps_and_quantized_weights():
    base = torch.randn(6, 3) @ torch.randn(3, 40)  # a stable subspace: the gap doubles
    grads = [base + 0.05 * g for g in random_grads((6, 40), 12, 2)]
    W0 = torch.randn(6, 40)
    W = torch.nn.Parameter(W0.clone())
    cfg = svdkit.config("q-galore", rank=3, update_gap=2, lazy_queue=2)
    opt = O.build([W], cfg, lr=0.01)

    def basis(X, _k):
        return fake_quantize(proj.top_left(X, 3), 4, 256)

    expected = reference(W0, grads, 2, 0.25, 0.01, basis, lazy=(0.4, 2), weight_bits=8)
    torch.testing.assert_close(_run(opt, W, grads), expected, rtol=1e-4, atol=1e-4)
    assert opt.state[W]["gap"] == 4


def test_online_subspace_descent_written_out():
    """SVD basis at the first step only; each step: Adam on R = Pᵀ X, W −= lr·scale·P N, then one Adam step on P
    for the online-PCA loss with lr = 5·lr (moments never reset)."""
    W0, grads = torch.randn(6, 10), random_grads((6, 10), 6, 3)
    W = torch.nn.Parameter(W0.clone())
    opt = O.build([W], svdkit.config("osd", rank=2), lr=0.02)
    got = _run(opt, W, grads)
    Wr, st, P = W0.clone(), {}, proj.top_left(grads[0], 2)
    for X in grads:
        Wr = Wr - 0.02 * 0.25 * P @ _adam(st, P.T @ X)
        P = P - 5 * 0.02 * _adam(st, proj.online_pca_grad(P, X, 0.1), "P")
    torch.testing.assert_close(got, Wr, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(opt.state[W]["proj"], P, rtol=1e-4, atol=1e-5)


def test_sst_round_written_out():
    """SST on W = U diag(σ) Vᵀ, loss ½‖W − T‖²: σ gets ∂L/∂σ = diag(Uᵀ G V); the sampled vectors get the
    enhanced gradients G v_i and Gᵀ u_i; Adam; after a round W is re-decomposed and the moments restart."""
    torch.manual_seed(0)
    linear, target = torch.nn.Linear(8, 6, bias=False), torch.randn(6, 8)
    layer = SSTLinear(linear)
    opt = SSTAdamW(list(layer.parameters()), [("l", layer)], rank=3, update_gap=2, seed=0, lr=0.01, weight_decay=0.0)
    U, S, V = (t.detach().clone() for t in (layer.U, layer.S, layer.V))
    st = {}
    for step in range(5):
        loss = 0.5 * ((layer.weight - target) ** 2).sum()
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 2 == 0:
            chosen = torch.multinomial(S.abs() + 1e-12, 3, generator=torch.Generator().manual_seed(layer_seed(0, f"l:{step // 2}")))
            active = torch.zeros(6, dtype=torch.bool)
            active[chosen] = True
        G = (U * S) @ V.T - target
        gS, gU, gV = torch.diagonal(U.T @ G @ V), (G @ V) * active, (G.T @ U) * active
        S = S - 0.01 * _adam(st, gS, "S")
        U, V = U - 0.01 * _adam(st, gU, "U") * active, V - 0.01 * _adam(st, gV, "V") * active
        if step % 2 == 1:  # the round ends: re-decompose (U, V orthonormal again), restart the moments
            u, S, vh = torch.linalg.svd((U * S) @ V.T, full_matrices=False)
            U, V, st = u, vh.T, {}
            torch.testing.assert_close(layer.U.T @ layer.U, torch.eye(6), rtol=0, atol=1e-5)
    assert layer.active.tolist() == active.tolist()
    torch.testing.assert_close(layer.weight.detach(), (U * S) @ V.T, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.S.detach(), S, rtol=1e-4, atol=1e-5)


def test_lost_trains_its_factors_with_adamw_on_their_exact_gradients():
    """W = B A + S Eᵀ: ∂L/∂B = G Aᵀ, ∂L/∂A = Bᵀ G, ∂L/∂S = G[:, C]; each takes torch AdamW's step."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(12, 8))
    cfg = svdkit.config("lost", rank=2, density=0.25)
    O.parametrize(model, cfg)
    layer = model[0]
    opt = O.build(model, cfg, lr=0.01)
    B, A, S, C = layer.B.detach().clone(), layer.A.detach().clone(), layer.S.detach().clone(), layer.channels
    target, st = torch.randn(8, 12), {}
    for _ in range(3):
        (0.5 * ((layer.weight - target) ** 2).sum()).backward()
        opt.step()
        opt.zero_grad()
        W = B @ A
        W[:, C] += S
        G = W - target
        B, A, S = B - 0.01 * _adam(st, G @ A.T, "B"), A - 0.01 * _adam(st, B.T @ G, "A"), S - 0.01 * _adam(st, G[:, C], "S")
    for got, want in ((layer.B, B), (layer.A, A), (layer.S, S)):
        torch.testing.assert_close(got.detach(), want, rtol=1e-4, atol=1e-5)


def test_design_example_with_on_switch_keep_runs_as_written():
    model = tiny_model("llama")
    param_groups = O.param_groups(model)
    opt = svdkit.optim.GaLoreAdamW(param_groups, lr=1e-3, rank=128, update_gap=200, scale=0.25, projection="svd",
                                   on_switch="keep")  # fmt: skip
    opt2 = svdkit.optim.build(list(model.parameters()), svdkit.config("q-galore", rank=128), lr=1e-3)
    ids = torch.randint(0, 100, (2, 8))
    model(ids, labels=ids).loss.backward()
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()) if p.grad is not None)
    assert all(g["on_switch"] == "keep" for g in opt.param_groups) and svdkit.config("galore").on_switch == "reset"
    opt2.step()
    assert math.isfinite(O.state_bytes(opt2))
