"""CLOVER (METHODS.md §15) and SoKA (§18): each method's defining equation against a direct implementation
of the paper's formula written here, parameter counts on real shapes, export refusal and option errors."""

from __future__ import annotations

import os
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import svdkit
from svdkit.adapters.api import adapted_layers
from svdkit.adapters.layers import SpectralLinear
from svdkit.adapters.zoo.soka import kronecker_rank
from svdkit.core.linalg_rank import elbow_rank, energy_rank

from conftest import VOCAB, model_output, perturb_adapters, tiny_model


def linear_model(shapes: dict[str, tuple[int, int]], seed: int = 0, dtype=torch.float64) -> nn.Module:
    """A container of named linears {name: (out, in)} with random weights and biases."""
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict((name, nn.Linear(n, m, dtype=dtype)) for name, (m, n) in shapes.items()))


def only_layer(model):
    (name, layer), = list(adapted_layers(model))  # fmt: skip
    return layer


def trainable_count(model) -> dict[str, int]:
    return {name: sum(p.numel() for _, p in layer.adapter_parameters()) for name, layer in adapted_layers(model)}


# -- CLOVER ----------------------------------------------------------------------------------------------
def reference_head_qr(W: np.ndarray, d: int):
    """Per head j: W_jᵀ = Q_j R_j with diag(R_j) ≥ 0 (numpy's QR, signs normalized)."""
    out = []
    for j in range(W.shape[0] // d):
        Q, R = np.linalg.qr(W[j * d:(j + 1) * d].T)
        D = np.sign(np.diag(R))
        out.append((Q * D, D[:, None] * R))
    return out


@pytest.mark.parametrize("alpha", [None, 4.0])
def test_clover_per_head_qr_and_update(alpha):
    model = linear_model({"q_proj": (12, 9)})
    W = model.q_proj.weight.detach().clone()
    cfg = svdkit.CLOVER(head_dim=4, alpha=alpha, compute_dtype="float64")
    svdkit.adapt(model, cfg)
    layer, s = only_layer(model), cfg.scaling
    ref = reference_head_qr(W.numpy(), 4)
    A, T = layer.lora_A.numpy(), layer.core.value.detach().numpy()
    for j, (Q, R) in enumerate(ref):
        assert np.allclose(A[4 * j:4 * j + 4], Q.T)  # A's rows = Q_jᵀ
        assert np.allclose(s * T[j], R)  # trainable core = R_j (/s)
        assert np.allclose(R.T @ Q.T, W[4 * j:4 * j + 4].numpy())  # W_j = R_jᵀ Q_jᵀ
    assert torch.equal(layer.delta_weight(), torch.zeros(12, 9, dtype=torch.float64))
    with torch.no_grad():
        layer.core.value.add_(torch.randn_like(layer.core.value))
    T = layer.core.value.detach().numpy()
    expected = np.concatenate([(s * T[j]).T @ Q.T for j, (Q, _) in enumerate(ref)])  # W'_j = (s T_j)ᵀ Q_jᵀ
    assert np.allclose(layer.merged_weight().detach().numpy(), expected)
    x = torch.randn(5, 9, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(model(x), x @ torch.from_numpy(expected).T + model.q_proj.bias)
    assert np.linalg.matrix_rank(layer.delta_weight().detach().numpy()) == 9  # a full-rank update


SMOL = {  # SmolLM2-135M's shapes: hidden 576, 9 heads of 64, 3 kv heads, intermediate 1536
    "model.layers.0.self_attn.q_proj": (576, 576),
    "model.layers.0.self_attn.k_proj": (192, 576),
    "model.layers.0.self_attn.v_proj": (192, 576),
    "model.layers.0.mlp.gate_proj": (1536, 576),
    "model.layers.0.mlp.up_proj": (1536, 576),
}


def test_clover_parameter_count_on_smollm2_shapes():
    model = linear_model({name.replace(".", "_"): shape for name, shape in SMOL.items()}, dtype=torch.float32)
    svdkit.adapt(model, svdkit.CLOVER(head_dim=64))  # default targets q_proj, v_proj, up_proj; SmolLM2's head size
    counts = trainable_count(model)
    # METHODS.md §15(c): n_h·d_h² (q) + n_kv·d_h² (v) + d_ff·d_h/2 (up)
    assert counts == {"model_layers_0_self_attn_q_proj": 9 * 64**2, "model_layers_0_self_attn_v_proj": 3 * 64**2,
                      "model_layers_0_mlp_up_proj": 1536 * 32}  # fmt: skip
    up = model.model_layers_0_mlp_up_proj
    assert tuple(up.core.value.shape) == (48, 32, 32)  # 48 pseudo-heads of head_dim/2
    assert tuple(model.model_layers_0_self_attn_v_proj.core.value.shape) == (3, 64, 64)  # GQA: 3 kv heads


@pytest.mark.parametrize("name,block", [
    ("model.layers.0.mlp.up_proj", 4), ("transformer.h.0.mlp.c_fc", 4), ("encoder.layer.0.intermediate.dense", 4),
    ("decoder.layers.0.fc1", 4), ("model.layers.0.mlp.gate_proj", 8), ("model.layers.0.self_attn.q_proj", 8),
    ("model.layers.0.mlp.down_proj", 8), ("encoder.layer.0.output.dense", 8),
])  # fmt: skip
def test_clover_block_size_rule(name, block):
    assert svdkit.CLOVER(head_dim=8).block_size(name) == block
    assert svdkit.CLOVER(head_dim=8, up_pattern=None).block_size(name) == 8


def test_clover_refuses_peft_export(tmp_path):
    model = linear_model({"q_proj": (8, 8)}, dtype=torch.float32)
    svdkit.adapt(model, svdkit.CLOVER(head_dim=4))
    with pytest.raises(ValueError, match="not low-rank.*merge"):
        svdkit.export_peft(model, tmp_path / "peft")


@pytest.mark.parametrize("options,match", [
    (dict(head_dim=7), "head_dim must be an even integer"),
    (dict(head_dim=0), "head_dim must be an even integer"),
    (dict(head_dim="64"), "head_dim must be an even integer"),
    (dict(up_pattern="up_proj("), "up_pattern 'up_proj\\(' is not a valid regular expression"),
])  # fmt: skip
def test_clover_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        svdkit.CLOVER(**options)


@pytest.mark.parametrize("shape,name,match", [
    ((12, 9), "q_proj", r"CLOVER: q_proj has a 12×9 weight .* 12 outputs do not split into heads of 8 rows"),
    ((12, 9), "up_proj", r"up_proj has a 12×9 weight .* pseudo-heads .* of 8 rows \(head_dim=16\)"),
    ((16, 4), "q_proj", r"q_proj has a 16×4 weight; the per-head QR needs in_features >= the head size 8"),
])  # fmt: skip
def test_clover_shape_errors_name_the_module(shape, name, match):
    model = linear_model({name: shape})
    head_dim = 16 if name == "up_proj" else 8
    with pytest.raises(ValueError, match=match):
        svdkit.adapt(model, svdkit.CLOVER(head_dim=head_dim, targets=name))
    assert not list(adapted_layers(model))


# -- CLOVER's V·O path (MHA) -------------------------------------------------------------------------------
def attention_block(n: int = 12, heads: int = 3, d: int = 4, seed: int = 0) -> nn.Module:
    """v_proj (h·d × n, no bias) and o_proj (n × h·d, with a bias) under one parent, as in an MHA block."""
    torch.manual_seed(seed)
    attn = nn.ModuleDict({"q_proj": nn.Linear(n, heads * d), "v_proj": nn.Linear(n, heads * d, bias=False),
                          "o_proj": nn.Linear(heads * d, n)})  # fmt: skip
    return nn.ModuleDict({"attn": attn.double()})


def head_blocks(Wo: torch.Tensor, Wv: torch.Tensor, d: int):
    """(W_o[:, h], W_v[h]) per head."""
    return [(Wo[:, h * d:(h + 1) * d], Wv[h * d:(h + 1) * d]) for h in range(Wv.shape[0] // d)]


@pytest.mark.parametrize("options", [{}, dict(alpha=4.0), dict(overrides={"o_proj": {"alpha": 2.0}})])
def test_clover_vo_pair_is_the_per_head_svd_of_w_o_w_v(options):
    model, d = attention_block(), 4
    Wv, Wo = model.attn.v_proj.weight.detach().clone(), model.attn.o_proj.weight.detach().clone()
    svdkit.adapt(model, svdkit.CLOVER(head_dim=d, targets="v_proj", compute_dtype="float64", **options))
    v, o = model.attn.v_proj, model.attn.o_proj  # o_proj joins as v_proj's partner, though not a target
    assert (v.weightless, o.weightless) == (True, True) and trainable_count(model) == {"attn.v_proj": 3 * d * d,
                                                                                        "attn.o_proj": 0}
    with torch.no_grad():
        Wv0, Wo0 = v.merged_weight(), o.merged_weight()
    assert torch.allclose(Wo0 @ Wv0, Wo @ Wv)  # jointly the original map at init …
    assert not torch.allclose(Wv0, Wv) and not torch.allclose(Wo0, Wo)  # … individually not
    for (Uh, Vh), (Oh, Wh) in zip(head_blocks(Wo0, Wv0, d), head_blocks(Wo, Wv, d)):
        u, S, vt = np.linalg.svd((Oh @ Wh).numpy())  # the n×n SVD of M_h, top d kept
        assert np.allclose(Uh.T @ Uh, np.eye(d))  # o's columns: orthonormal, the top-d left vectors of M_h
        assert np.allclose(np.abs(Uh.numpy().T @ u[:, :d]), np.eye(d), atol=1e-8)
        assert np.allclose((Vh @ Vh.T).numpy(), np.diag(S[:d] ** 2))  # v's rows: S_h V_hᵀ
        assert np.allclose(np.abs(Vh.numpy() @ vt[:d].T), np.diag(S[:d]), atol=1e-8)
    with torch.no_grad():
        v.core.value.add_(torch.randn_like(v.core.value))
    s, T, basis = v.scaling, v.core.value.detach(), v.lora_A  # basis rows: V_hᵀ
    expected_v = torch.cat([(s * T[h]).T @ basis[h * d:(h + 1) * d] for h in range(3)])  # (s·T_h)ᵀ V_hᵀ
    x = torch.randn(5, 12, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(v.merged_weight(), expected_v) and torch.allclose(o.merged_weight(), Wo0)
        assert torch.allclose(model.attn.o_proj(model.attn.v_proj(x)), x @ (Wo0 @ expected_v).T + o.bias)
    svdkit.unadapt(model)
    assert torch.equal(model.attn.v_proj.weight, Wv) and torch.equal(model.attn.o_proj.weight, Wo)


def mha_llama(hidden: int = 64, heads: int = 4, kv_heads: int = 4, seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, vocab_size=VOCAB, max_position_embeddings=64)  # fmt: skip
    return tf.LlamaForCausalLM(cfg).eval()


def test_clover_mha_llama_invariants(tmp_path, ids):
    """The paper's MHA setting (Llama, as many kv heads as heads): function-preserving init, the parameter
    count n_h·d² (q) + n_h·d² (v) + d_ff·d/2 (up) per block with o_proj frozen, merge, unadapt, save/load."""
    cfg, d = svdkit.CLOVER(head_dim=16), 16
    model, before = mha_llama(), mha_llama().state_dict()
    with torch.no_grad():
        y0 = model_output(model, ids)
        svdkit.adapt(model, cfg, progress=False)
        assert torch.allclose(model_output(model, ids), y0, atol=1e-5)
    counts = trainable_count(model)
    for i in range(2):
        block = {k.rsplit(".", 1)[-1]: v for k, v in counts.items() if f"layers.{i}." in k}
        assert block == {"q_proj": 4 * d * d, "v_proj": 4 * d * d, "o_proj": 0, "up_proj": 128 * d // 2}
    perturb_adapters(model)
    with torch.no_grad():
        y = model_output(model, ids)
    assert not torch.allclose(y, y0, atol=1e-3)
    svdkit.save_adapter(model, tmp_path / "a")
    loaded = svdkit.load_adapter(mha_llama(), tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(model_output(loaded, ids), y)
        svdkit.merge(loaded)
        assert torch.allclose(model_output(loaded, ids), y, atol=1e-5)
    svdkit.unadapt(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("options,paired", [({}, True), (dict(vo_pair=None), False), (dict(fold=True), True)])
def test_clover_vo_path_only_for_mha_pairs(options, paired):
    """MHA pairs take the V·O path (fold keeps W: unadapt needs it); GQA (fewer kv heads) or vo_pair=None: the QR."""
    for kv_heads, mha in ((4, True), (2, False)):
        model = mha_llama(kv_heads=kv_heads)
        svdkit.adapt(model, svdkit.CLOVER(head_dim=16, **options), progress=False)
        attn = model.model.layers[0].self_attn
        joint = paired and mha
        assert isinstance(attn.o_proj, SpectralLinear) == joint and attn.v_proj.weightless == joint
        assert attn.v_proj.weight is not None and not attn.v_proj.folded


def test_clover_vo_pair_names_and_errors():
    assert svdkit.config_from_dict(svdkit.CLOVER(vo_pair=("self.value", "output.dense")).to_dict()).vo_pair == (
        "self.value", "output.dense")  # fmt: skip
    for bad in (("v_proj",), ("v_proj", ""), ("v", "v"), "v_proj"):
        with pytest.raises(ValueError, match="vo_pair must be None or two different module-name suffixes"):
            svdkit.CLOVER(vo_pair=bad)
    bert = tiny_model("bert")  # BERT's value and output projections sit under different parents: named by suffix
    with pytest.raises(ValueError, match=r"encoder.layer.0.attention.self.value has a bias.*vo_pair=None"):
        svdkit.adapt(bert, svdkit.CLOVER(head_dim=8, targets="value", vo_pair=("self.value", "output.dense")))
    assert not list(adapted_layers(bert))


def attention_stack(blocks: int = 3) -> nn.Module:
    return nn.ModuleDict({f"b{i}": attention_block(seed=i) for i in range(blocks)})


VO_CFG = svdkit.CLOVER(head_dim=4, targets=("q_proj", "v_proj"))


def test_clover_grouped_init_split_across_ranks(tmp_path):
    """Under torchrun each rank initializes every world-th chunk (groups included) and broadcasts it."""
    from conftest import free_port

    mp.start_processes(_vo_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    expected = svdkit.adapt(attention_stack(), VO_CFG, progress=False).state_dict()
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got), rank
        assert sum(k.endswith(".core.value") for k in got) == 6  # 3 blocks: q (a batch) and v (a group) each


def _vo_worker(rank: int, world: int, port: int, out: str) -> None:
    from test_distributed import _leave

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    model = svdkit.adapt(attention_stack(), VO_CFG, progress=False)
    assert model.b2.attn.o_proj.weightless
    torch.save(model.state_dict(), f"{out}/rank{rank}.pt")
    _leave()


# -- SoKA ------------------------------------------------------------------------------------------------
def reference_rearrangement(W: torch.Tensor, m1: int, n1: int) -> torch.Tensor:
    """Van Loan's ℛ(W): one row per (m2 × n2) block, blocks in row-major order."""
    m2, n2 = W.shape[0] // m1, W.shape[1] // n1
    return torch.stack([W[i * m2:(i + 1) * m2, j * n2:(j + 1) * n2].reshape(-1) for i in range(m1) for j in range(n1)])


def kron_terms(sigma, U, V) -> torch.Tensor:
    return sum(s * torch.kron(u, v) for s, u, v in zip(sigma, U, V))


def test_soka_rearrangement_identity_with_all_terms():
    from svdkit.core.linalg_structured import kpsvd

    W = torch.randn(12, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    S, U, V = kpsvd(W, 3, 3, torch.float64)  # m1 = n1 = 3, m2 = 4, n2 = 3
    assert U.shape == (9, 3, 3) and V.shape == (9, 4, 3)
    assert torch.allclose(S, torch.linalg.svdvals(reference_rearrangement(W, 3, 3)))
    assert float((W - kron_terms(S, U, V)).norm()) < 1e-12 * float(W.norm())
    assert not torch.allclose(W, kron_terms(S[:3], U[:3], V[:3]))


SPECTRUM = torch.tensor([10.0, 9.0, 8.0, 1.0, 0.9, 0.8, 0.7, 0.6], dtype=torch.float64)


def test_soka_energy_and_elbow_rule_on_a_constructed_spectrum():
    # Σσ² = 248.3; E(k) = 0.403, 0.729, 0.987, 0.991, 0.994, …, 1: the threshold is first reached at
    assert [energy_rank(SPECTRUM, t) for t in (0.3, 0.5, 0.9, 0.99, 1.0)] == [1, 2, 3, 4, 8]
    assert elbow_rank(SPECTRUM) == 3  # σ² above the mean (31.04): 100, 81, 64
    assert kronecker_rank(SPECTRUM, 0.99, True, 16) == 3  # min(4, 3)
    assert kronecker_rank(SPECTRUM, 0.99, False, 16) == 4
    assert kronecker_rank(SPECTRUM, 0.5, True, 16) == 2
    assert kronecker_rank(SPECTRUM, 0.99, True, 2) == 2  # the rank cap
    assert elbow_rank(torch.ones(6)) == 6  # a flat spectrum has no elbow


def kronecker_weight(sigma: torch.Tensor, m1, n1, m2, n2, seed=0) -> torch.Tensor:
    """W = Σ σ_k U_k ⊗ V_k with orthonormal vec(U_k), vec(V_k): ℛ(W) has exactly the spectrum σ."""
    g = torch.Generator().manual_seed(seed)
    K = len(sigma)
    Uv = torch.linalg.qr(torch.randn(m1 * n1, K, generator=g, dtype=torch.float64)).Q.T
    Vv = torch.linalg.qr(torch.randn(m2 * n2, K, generator=g, dtype=torch.float64)).Q.T
    return kron_terms(sigma, Uv.reshape(K, m1, n1), Vv.reshape(K, m2, n2))


def test_soka_init_selects_the_rule_and_the_update_follows_the_equation():
    W = kronecker_weight(SPECTRUM, 3, 3, 4, 3)  # 12×9, ℛ(W) 9×12 with singular values SPECTRUM (and a 0)
    model = linear_model({"proj": (12, 9)})
    with torch.no_grad():
        model.proj.weight.copy_(W)
    cfg = svdkit.SoKA(rank=8, alpha=2.0, factors=(3, 3), energy=0.99, compute_dtype="float64", targets="proj")
    x = torch.randn(4, 9, dtype=torch.float64)
    with torch.no_grad():
        y0 = model(x)
    svdkit.adapt(model, cfg)
    layer, s = only_layer(model), cfg.scaling
    assert layer.core.u.shape == (3, 3, 3) and layer.core.v.shape == (3, 4, 3)  # R = min(r_E 4, elbow 3)
    assert torch.allclose(s * layer.core.sigma, SPECTRUM[:3])
    assert sum(p.numel() for _, p in layer.adapter_parameters()) == 3 * (3 * 3 + 4 * 3 + 1)
    with torch.no_grad():
        assert torch.equal(model(x), y0)  # the init is function-preserving (ΔW = 0 exactly)
        for p in (layer.core.sigma, layer.core.u, layer.core.v):
            p.add_(0.1 * torch.randn_like(p))
    c = layer.core
    top0 = kron_terms(c.sigma0 * s, c.u0, c.v0)  # the σ-weighted top-R terms removed into the residual
    assert torch.allclose(top0, kron_terms(SPECTRUM[:3], c.u0, c.v0))
    expected = (W - top0) + kron_terms(s * c.sigma.detach(), c.u.detach(), c.v.detach())  # W_res + Σ sτ U⊗V
    assert torch.allclose(layer.merged_weight(), expected)
    with torch.no_grad():
        assert torch.allclose(model(x), x @ expected.T + model.proj.bias)


def test_soka_keeps_frozen_terms_as_factors_not_a_dense_copy():
    model = linear_model({"proj": (32, 48)}, dtype=torch.float32)
    svdkit.adapt(model, svdkit.SoKA(rank=5, energy=1.0, elbow=False, targets="proj"))
    core = only_layer(model).core
    # automatic factors: 32 → 4·8 (|4 − 5.66| < |8 − 5.66|), 48 → 6·8
    assert core.u.shape == (5, 4, 6) and core.v.shape == (5, 8, 8)
    frozen = sum(b.numel() for b in core.buffers())
    assert frozen == sum(p.numel() for p in core.parameters()) == 5 * (4 * 6 + 8 * 8 + 1)


def test_soka_parameter_count_on_a_real_shape():
    # SmolLM2's up_proj shape, stored (out × in) = 1536 × 576: factors 32·48 and 24·24; five dominant
    # Kronecker terms over a small dense remainder, so that both criteria pick R = 5
    sigma = torch.tensor([5.0, 4.0, 3.0, 2.5, 2.0], dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    W = kronecker_weight(sigma, 32, 24, 48, 24) + 1e-4 * torch.randn(1536, 576, generator=g, dtype=torch.float64)
    model = linear_model({"mlp_up_proj": (1536, 576)}, dtype=torch.float32)
    with torch.no_grad():
        model.mlp_up_proj.weight.copy_(W.float())
    svdkit.adapt(model, svdkit.SoKA(energy=0.99, targets="up_proj"))
    core = only_layer(model).core
    assert core.u.shape == (5, 32, 24) and core.v.shape == (5, 48, 24)
    assert trainable_count(model) == {"mlp_up_proj": 5 * (32 * 24 + 48 * 24 + 1)}  # R(m1n1 + m2n2 + 1)


def test_soka_refuses_peft_export(tmp_path):
    model = linear_model({"proj": (8, 8)}, dtype=torch.float32)
    svdkit.adapt(model, svdkit.SoKA(rank=2, targets="proj"))
    with pytest.raises(ValueError, match="not low-rank.*merge"):
        svdkit.export_peft(model, tmp_path / "peft")


def test_soka_config_round_trips_with_factors():
    cfg = svdkit.SoKA(factors=(4, 6), energy=0.8, elbow=False)
    import json

    assert svdkit.config_from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("options,match", [
    (dict(energy=0.0), r"energy must be a cumulative-energy fraction in \(0, 1\], got 0.0"),
    (dict(energy=1.5), r"energy must be a cumulative-energy fraction in \(0, 1\], got 1.5"),
    (dict(factors=(0, 3)), r"factors must be None \(automatic\) or two positive integers \(m1, n1\)"),
    (dict(factors=(3,)), r"factors must be None \(automatic\) or two positive integers"),
    (dict(elbow="yes"), "elbow must be True or False"),
    (dict(svd="randomized"), "svd must be 'exact': the energy/elbow rank rule needs the full spectrum"),
])  # fmt: skip
def test_soka_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        svdkit.SoKA(**options)


def test_soka_factors_must_divide_the_weight():
    model = linear_model({"q_proj": (12, 9)})
    with pytest.raises(ValueError, match=r"SoKA: factors=\(5, 3\) do not divide q_proj's 12×9 weight"):
        svdkit.adapt(model, svdkit.SoKA(rank=2, factors=(5, 3), targets="q_proj"))
    assert not list(adapted_layers(model))
