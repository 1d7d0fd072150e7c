"""svdkit.optim: each update rule against a direct implementation of its equations on small matrices."""

from __future__ import annotations

import io

import pytest
import torch

import svdkit
import svdkit.optim as O
from svdkit.core.linalg import dct_matrix
from svdkit.optim import projection as proj
from svdkit.optim.quant import fake_quantize

from conftest import random_grads, tiny_model


pytestmark = pytest.mark.usefixtures("one_thread")




def _top_left(X, r):
    """Top-r left singular vectors, fp64 LAPACK, sign convention: largest-|entry| of each column positive."""
    U = torch.linalg.svd(X.double(), full_matrices=False)[0][:, :r]
    idx = U.abs().argmax(0)
    return (U * U[idx, torch.arange(r)].sign()).float()


def reference_galore(W, grads, r, T, scale, lr, on_switch, wd=0.0, b1=0.9, b2=0.999, eps=1e-8):
    """GaLore (arXiv:2403.03507 Alg. 2) written out: P on the smaller side, Adam on R = PᵀX, W -= lr·scale·P N."""
    W = W.clone()
    transposed = W.shape[0] > W.shape[1]
    P = m = v = None
    t = 0
    for k, G in enumerate(grads):
        X = G.T if transposed else G
        if k % T == 0:
            new = _top_left(X, r)
            if P is None or on_switch == "reset":
                m, v, t = torch.zeros(r, X.shape[1]), torch.zeros(r, X.shape[1]), 0
            elif on_switch == "rotate":
                C = new.T @ P
                mh, vh = m / (1 - b1**t), v / (1 - b2**t)
                m = C @ mh * (1 - b1**t)
                v = ((C * C) @ (vh - mh**2).clamp_min(0) + (C @ mh) ** 2) * (1 - b2**t)
            P = new
        R = P.T @ X
        t += 1
        m = b1 * m + (1 - b1) * R
        v = b2 * v + (1 - b2) * R * R
        N = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
        U = scale * P @ N
        W = W * (1 - lr * wd) - lr * (U.T if transposed else U)
    return W


@pytest.mark.parametrize("shape", [(6, 10), (10, 6)])
@pytest.mark.parametrize("on_switch", ["keep", "reset", "rotate"])
def test_galore_matches_the_written_out_update(shape, on_switch):
    W0 = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    grads = random_grads(shape, 7)
    W = torch.nn.Parameter(W0.clone())
    opt = O.GaLoreAdamW([W], lr=0.05, rank=3, update_gap=3, scale=0.5, on_switch=on_switch, weight_decay=0.1)
    for G in grads:
        W.grad = G.clone()
        opt.step()
    ref = reference_galore(W0, grads, 3, 3, 0.5, 0.05, on_switch, wd=0.1)
    torch.testing.assert_close(W.detach(), ref, rtol=1e-4, atol=1e-5)
    assert opt.state[W]["proj"].shape == (6, 3)  # the projector is on the smaller side


def test_vectors_and_excluded_matrices_get_torch_adamw():
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(4, 6))
    a2, b2 = torch.nn.Parameter(a.detach().clone()), torch.nn.Parameter(b.detach().clone())
    opt = O.GaLoreAdamW([{"params": [a]}, {"params": [b], "low_rank": False}], lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW([a2, b2], lr=1e-2, weight_decay=0.1)
    for ga, gb in zip(random_grads((5,), 4), random_grads((4, 6), 4, 1)):
        a.grad, b.grad, a2.grad, b2.grad = ga, gb, ga.clone(), gb.clone()
        opt.step()
        ref.step()
    torch.testing.assert_close(a, a2, rtol=0, atol=1e-7)
    torch.testing.assert_close(b, b2, rtol=0, atol=1e-7)


def test_full_rank_galore_with_scale_one_is_adam_in_a_rotated_basis_and_moves_along_the_gradient():
    # r = min(m, n), one refresh: the update stays in the span of the first gradient's left singular vectors
    G = torch.randn(4, 9)
    W = torch.nn.Parameter(torch.zeros(4, 9))
    opt = O.GaLoreAdamW([W], lr=1.0, rank=4, scale=1.0)
    W.grad = G
    opt.step()
    P = opt.state[W]["proj"]
    R = P.T @ G
    torch.testing.assert_close(W.detach(), -(P @ (R / (R.abs() + 1e-8))), rtol=1e-5, atol=1e-5)


def test_transport_maps_the_first_moment_exactly_and_a_permutation_permutes_the_second():
    m = torch.randn(3, 5)
    v = 0.25 * (m / 0.5) ** 2 + torch.rand(3, 5)  # a consistent pair: v̂ ≥ m̂²
    C = torch.eye(3)[[2, 0, 1]]
    m2, v2 = proj.transport(m, v, C, 0.5, 0.25)
    torch.testing.assert_close(m2, C @ m)
    torch.testing.assert_close(v2, C @ v)


def test_dct_selects_the_best_aligned_cosines_and_stores_only_indices():
    D = dct_matrix(8)
    X = 3 * D[5][:, None] * torch.randn(1, 20) + 2 * D[1][:, None] * torch.randn(1, 20) + 0.01 * torch.randn(8, 20)
    assert proj.dct_select(X, 2, D).tolist() == [5, 1]
    W = torch.nn.Parameter(torch.zeros(8, 20))
    opt = O.GaLoreAdamW([W], lr=0.1, rank=2, projection="dct")
    W.grad = X
    opt.step()
    assert "proj" not in opt.state[W] and opt.state[W]["proj_idx"].dtype == torch.int64
    torch.testing.assert_close(opt.projector(W), D[[5, 1]].T)


def test_online_pca_gradient_equals_autograd():
    P, X = torch.randn(6, 2, requires_grad=True), torch.randn(6, 9)
    Xn = X / X.norm()
    loss = ((P @ P.T @ Xn - Xn) ** 2).sum() + 0.1 * ((P.T @ P - torch.eye(2)) ** 2).sum()
    loss.backward()
    torch.testing.assert_close(proj.online_pca_grad(P.detach(), X, 0.1), P.grad, rtol=1e-5, atol=1e-6)


def test_online_pca_projector_follows_a_fixed_subspace():
    U = torch.linalg.qr(torch.randn(10, 2)).Q
    grads = [U @ torch.randn(2, 16) for _ in range(80)]
    W = torch.nn.Parameter(torch.zeros(10, 16))
    opt = O.GaLoreAdamW([W], lr=0.02, rank=2, projection="online-pca", update_gap=1)
    W.grad = torch.randn(10, 16)  # the first (SVD) basis is a wrong one
    opt.step()
    for G in grads:
        W.grad = G
        opt.step()
    P = torch.linalg.qr(opt.state[W]["proj"]).Q
    assert torch.linalg.svdvals(U.T @ P).min() > 0.9  # cosines of the principal angles


def test_fake_quantize_levels_and_unbiased_stochastic_rounding():
    x = torch.randn(3, 100)
    q = fake_quantize(x, 4, group=50)
    for block in q.reshape(-1, 50):
        assert len(torch.unique(block)) <= 16
    assert (q - x).abs().max() <= (x.max() - x.min()) / 15
    gen = torch.Generator().manual_seed(0)
    mean = torch.stack([fake_quantize(x, 2, 50, gen) for _ in range(200)]).mean(0)
    assert (mean - x).abs().mean() < 0.1 * (fake_quantize(x, 2, 50) - x).abs().mean() + 0.02


def test_q_galore_doubles_the_gap_of_a_layer_whose_subspace_is_stable():
    W = torch.nn.Parameter(torch.zeros(6, 8))
    opt = O.build([W], svdkit.config("q-galore", rank=2, update_gap=2, lazy_queue=2), lr=1e-3)
    G = torch.randn(6, 8)
    for _ in range(12):
        W.grad = G.clone()
        opt.step()
    assert opt.state[W]["gap"] >= 4  # refreshes at 0, 2, 4 agreed (cos = 1): the gap doubled
    report = O.memory_report(opt)
    assert report["quantized_state_bytes"] < report["state_bytes"] and report["weight_bytes_saved"] > 0
    assert len(torch.unique(W.detach())) <= 256  # INT8 weights (one block)
    assert len(torch.unique(opt.state[W]["proj"])) <= 16  # an INT4 projector (one block of 12 values)


def test_randomized_projection_finds_the_svd_subspace_and_random_is_a_seeded_orthonormal_basis():
    G = torch.randn(12, 3) @ torch.randn(3, 20)  # rank 3
    exact = proj.top_left(G, 3)
    fast = proj.top_left(G, 3, "randomized", seed=7)
    assert torch.linalg.svdvals(exact.T @ fast).min() > 0.999
    R1, R2 = proj.random_basis(12, 3, 5), proj.random_basis(12, 3, 5)
    assert torch.equal(R1, R2)
    torch.testing.assert_close(R1.T @ R1, torch.eye(3), rtol=0, atol=1e-5)


def test_galore_plus_shares_one_head_projector():
    model = tiny_model("llama")
    groups = O.param_groups(model, share_heads=True)
    assert sorted(g.get("heads", 0) for g in groups) == [0, 0, 2, 4]  # q: 4 heads, k/v: 2 kv heads
    opt = O.build(model, svdkit.config("galore-plus", rank=4), lr=1e-3)
    model(torch.randint(0, 100, (2, 8)), labels=torch.randint(0, 100, (2, 8))).loss.backward()
    opt.step()
    q = model.model.layers[0].self_attn.q_proj.weight
    P = opt.state[q]["proj"]  # input side (32 × 4), from the strongest head's 8 rows
    G = q.grad.view(4, 8, 32)
    h = int(G.square().sum((1, 2)).argmax())
    Vh = torch.linalg.svd(G[h].double())[2][:4].T.float()
    assert torch.linalg.svdvals(Vh.T @ P).min() > 0.99


def test_registry_build_and_config_round_trip():
    assert {"galore", "galore-dct", "osd", "q-galore", "galore-plus", "adamw", "muon"} <= set(svdkit.methods("optim"))
    cfg = svdkit.config("galore", rank=8, projection="random")
    assert svdkit.config_from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="projection"):
        svdkit.config("galore", projection="fft")
    model = tiny_model("llama")
    opt = O.build(model, cfg, lr=1e-3)
    low = {id(p) for g in opt.param_groups if g["low_rank"] for p in g["params"]}
    assert id(model.model.embed_tokens.weight) not in low and id(model.lm_head.weight) not in low
    assert len(low) == 14  # 7 linears in each of the 2 blocks
    assert isinstance(O.build(model, "muon", lr=1e-3), torch.optim.Optimizer)


CONFIGS = [dict(name="galore", projection="svd"), dict(name="galore", projection="randomized"), dict(name="sst"),
           dict(name="galore-dct"), dict(name="osd"), dict(name="q-galore"), dict(name="galore", projection="random"),
           dict(name="muon"), dict(name="galore-plus")]  # fmt: skip


def _base_lm(seed=0):
    """An embedding, a 2-layer MLP block, a norm and a head: matrices of both orientations, and vectors."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.Linear(16, 24), torch.nn.Tanh(),
                               torch.nn.Linear(24, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 50))  # fmt: skip


_tiny_lm = _base_lm


def _steps(model, opt, g, n):
    for _ in range(n):
        ids = torch.randint(0, 50, (4, 6), generator=g)
        logits = model(ids)
        torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 50), ids[:, 1:].reshape(-1)).backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("spec", CONFIGS, ids=lambda s: "-".join(map(str, s.values())))
def test_resume_after_weights_only_load_is_bit_identical(spec):
    """2T steps in one go == T steps, state_dict → torch.save → torch.load(weights_only=True) into a fresh
    model and optimizer, T more steps (T = 3 with a refresh every 2 steps, so a refresh follows the resume)."""
    spec = dict(spec)
    name = spec.pop("name")
    cfg = svdkit.config(name) if name == "muon" else svdkit.config(name, rank=4, update_gap=2, **spec)

    def _tiny_lm(seed=0):
        model = _base_lm(seed)
        return O.parametrize(model, cfg) if name == "sst" else model

    a = _tiny_lm()
    opt_a = O.build(a, cfg, lr=1e-2)
    _steps(a, opt_a, torch.Generator().manual_seed(0), 6)
    b = _tiny_lm()
    opt_b = O.build(b, cfg, lr=1e-2)
    g = torch.Generator().manual_seed(0)
    _steps(b, opt_b, g, 3)
    buf = io.BytesIO()
    torch.save({"opt": opt_b.state_dict(), "model": b.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    c = _tiny_lm(seed=5)
    c.load_state_dict(saved["model"])  # (SST: the SVD of another init, overwritten: U, σ, V and the round's vectors)
    opt_c = O.build(c, cfg, lr=1e-2)
    opt_c.load_state_dict(saved["opt"])
    _steps(c, opt_c, g, 3)
    for (n, p), q in zip(a.named_parameters(), c.parameters()):
        assert torch.equal(p, q), (name, n)


def test_galore_torch_parity():
    galore_torch = pytest.importorskip("galore_torch", reason="galore-torch not installed (pip install --no-deps galore-torch bitsandbytes)")
    for shape in [(6, 10), (10, 6)]:
        W0 = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
        grads = random_grads(shape, 5, 3)
        ours, theirs = torch.nn.Parameter(W0.clone()), torch.nn.Parameter(W0.clone())
        opt = O.GaLoreAdamW([ours], lr=0.01, rank=3, update_gap=100, scale=0.25, eps=1e-12)
        ref = galore_torch.GaLoreAdamW([{"params": [theirs], "rank": 3, "update_proj_gap": 100, "scale": 0.25,
                                         "proj_type": "std"}], lr=0.01, eps=1e-12, no_deprecation_warning=True)  # fmt: skip
        for G in grads:
            ours.grad, theirs.grad = G.clone(), G.clone()
            opt.step()
            ref.step()
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)



def test_sst_layer_is_the_svd_and_trains_only_the_sampled_vectors():
    model = _tiny_lm()
    W0 = model[1].weight.detach().clone()
    O.parametrize(model, svdkit.config("sst", rank=3, update_gap=2))
    layer = model[1]
    torch.testing.assert_close(layer.weight, W0, rtol=1e-4, atol=1e-5)
    assert type(model[5]).__name__ == "SSTLinear"  # nn.Sequential has no get_output_embeddings: every linear swapped
    opt = O.build(model, svdkit.config("sst", rank=3, update_gap=2), lr=1e-2)
    U0, V0, S0 = layer.U.detach().clone(), layer.V.detach().clone(), layer.S.detach().clone()
    _steps(model, opt, torch.Generator().manual_seed(0), 1)
    moved = (layer.U - U0).abs().sum(0) > 0
    assert moved.tolist() == layer.active.tolist() and int(layer.active.sum()) == 3
    assert not torch.equal(layer.S, S0) and ((layer.V - V0).abs().sum(0) > 0).tolist() == layer.active.tolist()
    _steps(model, opt, torch.Generator().manual_seed(1), 1)
    W = layer.weight.detach().clone()
    layer.resvd()  # what step 2 starts with: the same W, U and V orthonormal again
    torch.testing.assert_close(layer.weight, W, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.U.T @ layer.U, torch.eye(16), rtol=0, atol=1e-4)
    _steps(model, opt, torch.Generator().manual_seed(2), 1)
    assert int(opt.state[layer.U]["step"]) == 1  # the moments restarted with the new basis


def test_lost_split_is_low_rank_plus_channel_sparse():
    torch.manual_seed(0)
    linear = torch.nn.Linear(20, 12)
    from svdkit.optim.lost import LOSTLinear

    layer = LOSTLinear(linear, rank=4, density=0.25)
    W = linear.weight.detach()
    U, S, Vh = torch.linalg.svd(W.double())
    R = W.double() - (U[:, :4] * S[:4]) @ Vh[:4]
    cols = torch.topk(R.norm(dim=0), 5).indices.sort().values
    assert layer.channels.tolist() == cols.tolist()
    expected = (U[:, :4] * S[:4]) @ Vh[:4]
    expected[:, cols] = W.double()[:, cols]  # exact on the kept channels, rank-4 elsewhere
    torch.testing.assert_close(layer.weight.double(), expected, rtol=1e-4, atol=1e-5)
    x = torch.randn(3, 20)
    torch.testing.assert_close(layer(x), x @ layer.weight.T + linear.bias, rtol=1e-5, atol=1e-6)
