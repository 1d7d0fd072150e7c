"""clover-prune: CLOVER's per-KV-head V·O pruning against a direct dense computation on tiny GQA/MHA Llamas,
parameter counts, allocation, the saved format (round trip, dense export), the CLI and the refusals."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import svdkit
from svdkit.cli import main
from svdkit.compression import PrunedOutput, PrunedValue
from svdkit.compression.clover_prune import allocate
from tests.conftest import tiny_model

IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _layout(model):
    c = model.config
    return c.num_attention_heads, c.num_key_value_heads, c.hidden_size // c.num_attention_heads


def _products(Wo, Wv, heads, kv, d):
    """Direct: per KV head g the dense stack [W_o[:, h] W_v[g] for h ∈ G(g)] (|G|·m × n), h = g·|G| … ."""
    group = heads // kv
    return [torch.cat([Wo[:, h * d: (h + 1) * d] @ Wv[g * d: (g + 1) * d] for h in range(g * group, (g + 1) * group)])
            for g in range(kv)]  # fmt: skip


@pytest.mark.parametrize("arch", ["llama", "llama-mha"])
def test_pruned_products_are_the_truncated_svd_and_the_error_is_the_discarded_singular_values(arch):
    model = tiny_model(arch)
    heads, kv, d = _layout(model)
    originals = {i: (layer.self_attn.v_proj.weight.detach().double().clone(), layer.self_attn.o_proj.weight.detach().double().clone())
                 for i, layer in enumerate(model.model.layers)}  # fmt: skip
    report = svdkit.compress(model, svdkit.config("clover-prune", ratio=0.4), progress=False)
    k = round(0.6 * d)
    for i, layer in enumerate(model.model.layers):
        Wv, Wo = originals[i]
        v, o = layer.self_attn.v_proj, layer.self_attn.o_proj
        assert isinstance(v, PrunedValue) and isinstance(o, PrunedOutput)
        new = _products(o.dense().weight.detach().double(), v.dense().weight.detach().double(), heads, kv, d)
        row = next(r for r in report.rows if r.name == f"model.layers.{i}.self_attn.v_proj")
        assert row.extra["kept_per_kv_head"] == [k] * kv
        for g, M in enumerate(_products(Wo, Wv, heads, kv, d)):
            U, S, Vh = torch.linalg.svd(M, full_matrices=False)
            best = U[:, :k] @ torch.diag(S[:k]) @ Vh[:k]
            assert torch.allclose(new[g], best, atol=1e-5)
            discarded = float(S[k:].square().sum())
            assert float((M - new[g]).square().sum()) == pytest.approx(discarded, rel=1e-4)
            assert row.extra["discarded_sq"][g] == pytest.approx(discarded, rel=1e-6)
            assert torch.linalg.matrix_rank(new[g]) == k


@pytest.mark.parametrize("arch", ["llama", "llama-mha"])
def test_keeping_every_direction_keeps_the_logits(arch):
    model = tiny_model(arch)
    before = _logits(model)
    report = svdkit.compress(model, svdkit.config("clover-prune", ratio=0.01), progress=False)  # < half a direction of 8
    assert report.removed == 0.0 and isinstance(model.model.layers[0].self_attn.v_proj, PrunedValue)
    assert torch.allclose(_logits(model), before, atol=1e-5)


def test_parameter_counts_match_the_kept_directions():
    model = tiny_model("llama")
    heads, kv, d = _layout(model)
    n = m = model.config.hidden_size
    total = sum(p.numel() for p in model.parameters())
    report = svdkit.compress(model, svdkit.config("clover-prune", ratio=0.5), progress=False)
    layers = model.config.num_hidden_layers
    assert report.params_before == layers * (kv * d * n + m * heads * d)
    kept = d // 2
    assert report.params_after == layers * (kv * kept * n + m * heads * kept)
    assert report.removed == pytest.approx(0.5)
    assert total - sum(p.numel() for p in model.parameters()) == report.params_before - report.params_after
    uniform = svdkit.compress(tiny_model("llama"), svdkit.config("clover-prune", ratio=0.3), progress=False)
    assert uniform.removed == pytest.approx(1 - round(0.7 * d) / d)  # whole directions, nearest the ratio


def test_global_allocation_keeps_the_largest_directions_within_the_budget():
    g = torch.Generator().manual_seed(0)
    spectra = [torch.rand(3, 8, generator=g, dtype=torch.float64).sort(1, descending=True).values * s for s in (1, 5)]
    ranks = allocate(spectra, [10, 10], 8, 0.5, "global")
    assert sum(int(k.sum()) for k in ranks) == 24  # half of 2 blocks × 3 heads × 8 directions
    assert all(int(k.min()) >= 1 for k in ranks)
    kept = torch.cat([S[h, 1:k] for S, r in zip(spectra, ranks) for h, k in enumerate(r.tolist())])
    dropped = torch.cat([S[h, k:] for S, r in zip(spectra, ranks) for h, k in enumerate(r.tolist())])
    assert float(kept.min()) >= float(dropped.max())  # one threshold: every optional kept σ beats every dropped one
    assert int(ranks[1].sum()) > int(ranks[0].sum())  # the larger spectrum keeps more
    with pytest.raises(ValueError, match="less than one direction"):
        allocate(spectra, [10, 10], 8, 0.99, "global")
    model = tiny_model("llama")
    report = svdkit.compress(model, svdkit.config("clover-prune", ratio=0.25, allocation="global"), progress=False)
    assert report.removed == pytest.approx(0.25)  # 32 directions in all: 8 pruned
    assert torch.isfinite(_logits(model)).all()


def test_round_trip_dense_export_and_lora_on_the_pruned_projections(tmp_path):
    import transformers as tf

    model = tiny_model("llama")
    cfg = svdkit.config("clover-prune", ratio=0.4, allocation="global")
    report = svdkit.compress(model, cfg, progress=False)
    out = svdkit.save_compressed(model, tmp_path / "small", config=cfg, report=report, dense=True)
    meta = json.loads((out / "svdkit.json").read_text())
    assert {s["type"] for s in meta["modules"].values()} == {"pruned-value", "pruned-output"}
    assert meta["config"]["_type"] == "clover-prune" and meta["config"]["allocation"] == "global"
    loaded = svdkit.load_compressed(out)
    assert torch.equal(_logits(loaded), _logits(model))
    v = loaded.model.layers[1].self_attn.v_proj
    assert isinstance(v, PrunedValue) and torch.equal(v.index, model.model.layers[1].self_attn.v_proj.index)
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in model.parameters())
    dense = tf.AutoModelForCausalLM.from_pretrained(str(out / "dense"))
    assert type(dense.model.layers[0].self_attn.v_proj) is nn.Linear
    assert torch.allclose(_logits(dense), _logits(model), atol=1e-5)
    svdkit.adapt(loaded, svdkit.config("lora", rank=2))
    trained = {n for n, p in loaded.named_parameters() if p.requires_grad}
    assert any(".v_proj.proj." in n for n in trained) and any(".o_proj.proj." in n for n in trained)


def test_cli_and_methods_table(tiny_run_inputs, tmp_path, capsys):
    model_dir, data = tiny_run_inputs
    out = tmp_path / "pruned"
    assert main(["compress", "--model", str(model_dir), "--method", "clover-prune", "--ratio", "0.25", "--calibration-data",
                 str(data), "--heldout", "4", "--out", str(out), "--dense"]) == 0  # fmt: skip
    text = (out / "report.md").read_text()
    assert "clover-prune" in text and "calibration none (data-free)" in text and "v_proj" in text
    assert (out / "dense" / "config.json").is_file()
    assert main(["methods"]) == 0
    assert "clover-prune" in capsys.readouterr().out
    assert "clover-prune" in svdkit.methods("compress")


def test_refusals_name_the_module_and_change_nothing():
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    attn = model.model.layers[1].self_attn
    attn.v_proj.bias = nn.Parameter(torch.zeros(attn.v_proj.out_features))
    with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.v_proj has a bias"):
        svdkit.compress(model, svdkit.config("clover-prune"), progress=False)
    attn.v_proj.bias = None
    with pytest.raises(ValueError, match="no sibling output projection"):
        svdkit.compress(model, svdkit.config("clover-prune", vo_pair=("v_proj", "out_proj")), progress=False)
    with pytest.raises(ValueError, match="none of the targeted linears is a value projection"):
        svdkit.compress(model, svdkit.config("clover-prune", targets="mlp"), progress=False)
    model.config.num_key_value_heads = 1
    with pytest.raises(ValueError, match="do not match the config's attention layout"):
        svdkit.compress(model, svdkit.config("clover-prune"), progress=False)
    model.config.num_key_value_heads = 3
    with pytest.raises(ValueError, match="head layout"):
        svdkit.compress(model, svdkit.config("clover-prune"), progress=False)
    model.config.num_key_value_heads = 2
    with pytest.raises(ValueError, match="data-free"):
        svdkit.compress(model, svdkit.config("clover-prune"), calibration=[{"input_ids": IDS}])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="none of the targeted linears is a value projection"):
        svdkit.compress(tiny_model("gpt2"), svdkit.config("clover-prune"), progress=False)  # fused c_attn
    for bad in ({"allocation": "greedy"}, {"vo_pair": ("v_proj", "v_proj")}, {"ratio": 1.0}):
        with pytest.raises(ValueError):
            svdkit.config("clover-prune", **bad)
    factored = tiny_model("llama")
    svdkit.compress(factored, svdkit.config("svd", ratio=0.5, targets="o_proj"))
    with pytest.raises(ValueError, match=r"o_proj is a LowRankLinear, not a plain nn.Linear"):
        svdkit.compress(factored, svdkit.config("clover-prune"), progress=False)


@pytest.mark.real_model
def test_default_model_gqa_pruning_is_exact_when_kept_and_round_trips(tmp_path):
    """SmolLM2 (9 heads, 3 KV heads of 64): all directions kept → same logits; 20 % of one block's V·O → saved,
    reloaded as pruned modules with identical logits."""
    import copy

    original, tok = svdkit.load_model("default")
    ids = torch.tensor([tok("The river rises in the hills to the north of the town.")["input_ids"]])
    before = _logits(original, ids)
    model = copy.deepcopy(original)
    kept = svdkit.compress(model, svdkit.config("clover-prune", ratio=0.005, targets=r"layers\.(0|7)\."), progress=False)
    assert kept.removed == 0.0 and torch.allclose(_logits(model, ids), before, atol=2e-4, rtol=1e-4)
    model = original
    cfg = svdkit.config("clover-prune", ratio=0.2, targets=r"layers\.0\.")
    report = svdkit.compress(model, cfg, progress=False)
    assert [r.name for r in report.rows] == ["model.layers.0.self_attn.v_proj", "model.layers.0.self_attn.o_proj"]
    assert report.rows[0].extra["kept_per_kv_head"] == [51, 51, 51] and report.removed == pytest.approx(13 / 64)
    out = svdkit.save_compressed(model, tmp_path / "pruned", tokenizer=tok, config=cfg)
    loaded, _ = svdkit.load_model(out)
    assert isinstance(loaded.model.layers[0].self_attn.o_proj, PrunedOutput)
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))
