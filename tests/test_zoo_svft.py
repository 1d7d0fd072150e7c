"""SVFT (METHODS.md §6, https://arxiv.org/abs/2405.19597): W' = U(Σ + σ(g)·M)Vᵀ with a sparse M.

The expected values are written from the paper's formulas (references in tests/rows/svft.py), never from
svdkit's helpers.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import svdkit
from svdkit.core.linalg import layer_seed

from rows.svft import banded, reference_svd


class One(nn.Module):
    def __init__(self, m: int, n: int, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.proj = nn.Linear(n, m).double()

    def forward(self, x):
        return self.proj(x)


def adapted(m=12, n=9, **options):
    model = One(m, n)
    W = model.proj.weight.detach().clone()
    svdkit.adapt(model, svdkit.SVFT(compute_dtype="float64", **options))
    return model, W


def positions(layer) -> list[tuple[int, int]]:
    return list(zip(layer.core.rows.tolist(), layer.core.cols.tolist()))


def randomize(layer, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.core.values.copy_(torch.randn(layer.core.values.shape, generator=g, dtype=torch.float64))
        layer.core.gate.fill_(0.7)


SHAPES = [(12, 9), (9, 12)]
OPTIONS = [dict(), dict(pattern="banded", bands=1), dict(pattern="random", num_entries=7),
           dict(pattern="top-k", num_entries=7)]  # fmt: skip


@pytest.mark.parametrize("m,n", SHAPES)
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: o.get("pattern", "plain"))
def test_update_is_U_sigma_plus_gated_M_Vt(m, n, options):
    model, W = adapted(m, n, **options)
    layer = model.proj
    randomize(layer)
    U, S, Vh = reference_svd(W)
    k = min(m, n)
    M = torch.zeros(k, k, dtype=torch.float64)
    for (i, j), v in zip(positions(layer), layer.core.values.detach()):
        M[i, j] += v
    gated = torch.sigmoid(torch.tensor(0.7, dtype=torch.float64)) * M
    expected = U @ (torch.diag(S) + gated) @ Vh  # the paper's W' = U(Σ + σ(g)M)Vᵀ
    torch.testing.assert_close(layer.merged_weight(), expected)
    x = torch.randn(4, n, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), x @ expected.T + layer.bias)
    assert torch.equal(layer.weight, W)  # W itself is never written


@pytest.mark.parametrize("m,n", SHAPES)
def test_frozen_bases_are_the_sign_fixed_svd(m, n):
    """The reference sign convention (used by the kaiming conformance row) is svdkit's fix_signs."""
    model, W = adapted(m, n)
    U, _, Vh = reference_svd(W)
    torch.testing.assert_close(model.proj.lora_B, U)
    torch.testing.assert_close(model.proj.lora_A, Vh)
    assert not model.proj.lora_A.requires_grad and not model.proj.lora_B.requires_grad


def test_zero_init_preserves_the_function_and_the_gate_starts_at_half():
    model = One(12, 9)
    x = torch.randn(5, 9, dtype=torch.float64)
    with torch.no_grad():
        y0 = model(x)
    svdkit.adapt(model, svdkit.SVFT(pattern="banded", bands=2, init="zero"))
    core = model.proj.core
    assert torch.equal(core.values, torch.zeros_like(core.values)) and float(core.gate.detach()) == 0.0
    with torch.no_grad():  # computed from U(Σ + ·)Vᵀ (Mode.FACTORS): W x up to the fp32 SVD's rounding
        torch.testing.assert_close(model(x), y0, atol=1e-5, rtol=1e-5)
        core.values.fill_(1.0)
        expected = torch.diag(core.sigma)  # Σ/s, the part of C that stands for W
        for i, j in banded(9, 2):
            expected[i, j] += 0.5  # σ(0)·M with M = 1 on the band
        torch.testing.assert_close(core(), expected)


def test_plain_and_banded_positions():
    plain, _ = adapted()
    assert positions(plain.proj) == [(i, i) for i in range(9)]
    band, _ = adapted(pattern="banded", bands=2)
    assert positions(band.proj) == banded(9, 2)
    wide, _ = adapted(pattern="banded", bands=20)  # d ≥ k − 1: the whole of M
    assert sorted(positions(wide.proj)) == [(i, j) for i in range(9) for j in range(9)]


def test_random_positions_are_distinct_seeded_per_layer_and_reproducible():
    p = 30
    a, _ = adapted(pattern="random", num_entries=p)
    b, _ = adapted(pattern="random", num_entries=p)
    c, _ = adapted(pattern="random", num_entries=p, seed=1)
    pa = positions(a.proj)
    assert len(set(pa)) == p and all(0 <= i < 9 and 0 <= j < 9 for i, j in pa)  # without replacement
    assert pa == positions(b.proj) and pa != positions(c.proj)
    flat = torch.randperm(81, generator=torch.Generator().manual_seed(layer_seed(0, "proj")))[:p].sort().values
    assert pa == [(int(f) // 9, int(f) % 9) for f in flat]  # seeded by layer_seed(seed, module name)


@pytest.mark.parametrize("m,n", [(9, 9), (12, 9), (9, 12)])
def test_top_k_takes_the_largest_alignments(m, n):
    p = 10
    model, W = adapted(m, n, pattern="top-k", num_entries=p)
    U, _, Vh = reference_svd(W)
    k = min(m, n)
    # u_iᵀ v_j (the paper); for m ≠ n on the first k coordinates of each vector
    score = {(i, j): float(U[:k, i] @ Vh[j, :k]) for i in range(k) for j in range(k)}
    best = sorted(score, key=lambda ij: -score[ij])[:p]
    assert sorted(positions(model.proj)) == sorted(best)
    chosen = min(score[ij] for ij in best)
    assert all(score[ij] <= chosen for ij in score if ij not in best)


@pytest.mark.parametrize("pattern", ["random", "top-k"])
def test_a_batch_of_layers_initializes_as_each_layer_alone(pattern):
    """Accelerators decompose same-shaped layers in one batched call: the result must not change."""
    cfg = svdkit.SVFT(pattern=pattern, num_entries=8, init="kaiming")
    weights = torch.randn(2, 12, 9, generator=torch.Generator().manual_seed(0))
    both = cfg.initialize(weights, ["a", "b"])
    for i, name in enumerate(["a", "b"]):
        alone = cfg.initialize(weights[i : i + 1], [name])
        torch.testing.assert_close(both.A[i], alone.A[0])
        torch.testing.assert_close(both.B[i], alone.B[0])
        assert all(torch.equal(both.core[key][i], alone.core[key][0]) for key in both.core)
    assert not torch.equal(both.core["values"][0], both.core["values"][1])  # seeded per layer name


def test_kaiming_init_values_and_change():
    model, W = adapted(pattern="random", num_entries=20, init="kaiming")
    layer = model.proj
    g = torch.Generator().manual_seed(layer_seed(0, "proj"))
    torch.randperm(81, generator=g)  # the positions come first from the same generator
    expected = torch.randn(20, generator=g).double() * math.sqrt(2.0 / 20)
    torch.testing.assert_close(layer.core.values.detach(), expected)
    U, _, Vh = reference_svd(W)
    M0 = torch.zeros(9, 9, dtype=torch.float64)
    for (i, j), v in zip(positions(layer), expected):
        M0[i, j] = v
    torch.testing.assert_close(layer.delta_weight(), 0.5 * U @ M0 @ Vh)


def test_gradients_reach_values_and_gate():
    model, W = adapted(pattern="banded", bands=1)
    layer = model.proj
    randomize(layer)
    x = torch.randn(6, 9, dtype=torch.float64)
    model(x).pow(2).sum().backward()
    values = layer.core.values.detach().clone().requires_grad_(True)
    gate = layer.core.gate.detach().clone().requires_grad_(True)
    U, _, Vh = reference_svd(W)
    M = torch.zeros(9, 9, dtype=torch.float64)
    rows, cols = layer.core.rows, layer.core.cols
    M = M.index_put((rows, cols), values)  # positions are distinct here
    y = x @ (W + U @ (torch.sigmoid(gate) * M) @ Vh).T + layer.bias.detach()
    y.pow(2).sum().backward()
    torch.testing.assert_close(layer.core.values.grad, values.grad)
    torch.testing.assert_close(layer.core.gate.grad, gate.grad)


def test_repeated_positions_add_up_and_core_round_trips():
    cfg = svdkit.SVFT()
    tensors = dict(values=torch.tensor([1.0, 2.0, 4.0]), gate=torch.zeros(1), rows=torch.tensor([0, 0, 2]),
                   cols=torch.tensor([1, 1, 0]), size=torch.tensor(3))  # fmt: skip
    core = cfg.make_core(tensors)
    expected = torch.zeros(3, 3)
    expected[0, 1], expected[2, 0] = 0.5 * 3.0, 0.5 * 4.0
    torch.testing.assert_close(core(), expected)
    saved = dict(core.named_parameters()) | dict(core.named_buffers())
    assert set(saved) == set(tensors) and all(torch.equal(saved[k], tensors[k].to(saved[k].dtype)) for k in tensors)
    assert {n for n, _ in core.named_parameters()} == {"values", "gate"}
    with pytest.raises(ValueError, match="SVFT core takes"):
        cfg.make_core({"values": tensors["values"]})


@pytest.mark.parametrize(
    "options,count",
    [(dict(), 192), (dict(pattern="banded", bands=16), 192 * 33 - 16 * 17),
     (dict(pattern="random"), 192 * 33 - 16 * 17), (dict(pattern="top-k", num_entries=100), 100),
     (dict(pattern="banded", bands=2), 192 * 5 - 6)],
)  # fmt: skip
def test_parameter_count_on_a_real_shape(options, count):
    """SmolLM2-135M's k_proj (192×576): METHODS.md §6 (c), plus the gate; U, V are frozen buffers."""
    model = One(192, 576)
    svdkit.adapt(model, svdkit.SVFT(**options))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == count + 1
    frozen = model.proj.lora_A.numel() + model.proj.lora_B.numel()
    assert frozen == (192 + 576) * 192  # the extra memory: (m+n)k


def test_export_is_refused_with_a_pointer_to_merging(tmp_path):
    model, _ = adapted()
    assert svdkit.SVFT.exports_lora is False and svdkit.SVFT.uses_rank is False
    with pytest.raises(ValueError, match="merge"):
        svdkit.export_peft(model, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


def test_method_defaults():
    cfg = svdkit.config("svft")
    assert (cfg.pattern, cfg.init, cfg.svd_rank, cfg.scaling) == ("plain", "kaiming", None, 1.0)  # METHODS §6 [code]
    assert svdkit.SVFT.lr == 5e-2 and svdkit.SVFT.weight_decay == 0.0
    assert svdkit.config_from_dict(svdkit.SVFT(pattern="top-k", num_entries=5, init="zero").to_dict()) == \
        svdkit.SVFT(pattern="top-k", num_entries=5, init="zero")  # fmt: skip


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(pattern="diagonal"), r"SVFT: pattern must be one of 'plain', 'banded', 'random', 'top-k'"),
        (dict(init="normal"), r"SVFT: init must be one of 'zero', 'kaiming'"),
        (dict(pattern="banded", bands=-1), r"SVFT: bands must be None or an integer >= 0"),
        (dict(pattern="banded", bands=True), r"SVFT: bands must be"),
        (dict(pattern="random", num_entries=0), r"SVFT: num_entries must be None or an integer >= 1"),
        (dict(bands=2), r"SVFT: pattern 'plain' is the diagonal"),
        (dict(pattern="banded", num_entries=5), r"num_entries applies to the 'random' and 'top-k' patterns"),
        (dict(pattern="random", bands=2, num_entries=5), r"not both"),
    ],
)
def test_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        svdkit.SVFT(**options)


def test_fold_drops_the_weight_and_computes_from_the_factors():
    from conftest import model_output, perturb_adapters, tiny_model
    from svdkit.adapters.api import adapted_layers

    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    kept, folded = tiny_model("llama"), tiny_model("llama")
    original = {n: p.detach().clone() for n, p in folded.named_parameters()}
    svdkit.adapt(kept, svdkit.SVFT(pattern="banded", bands=1), progress=False)
    svdkit.adapt(folded, svdkit.SVFT(pattern="banded", bands=1, fold=True), progress=False)
    for model in (kept, folded):
        perturb_adapters(model)
    for (_, a), (_, b) in zip(adapted_layers(kept), adapted_layers(folded)):
        assert a.weight is not None and b.weight is None and b.base.weight is None  # W is not held
        m, n = b.out_features, b.in_features
        held = sum(t.numel() for t in (*b.buffers(), *b.parameters()) if t.is_floating_point())
        assert held < m * n + (m + n) * min(m, n)  # only the factors, the core and the bias
        torch.testing.assert_close(b.merged_weight(), a.merged_weight(), atol=1e-5, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(model_output(folded, ids), model_output(kept, ids), atol=1e-5, rtol=0)
    svdkit.unadapt(folded)
    for name, p in folded.named_parameters():  # W = UΣVᵀ again, up to rounding
        torch.testing.assert_close(p, original[name], atol=1e-6, rtol=0)
