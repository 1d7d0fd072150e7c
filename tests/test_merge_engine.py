"""The streaming merge engine on tiny models: folders (sharded), in-memory models, PEFT LoRAs, svdkit adapters,
LoRA output, streaming memory, bad input, and the `svdkit merge` CLI producing a folder transformers loads."""

from __future__ import annotations

import copy
import hashlib
import json
import weakref
from pathlib import Path

import pytest
import torch

import svdkit
from svdkit.merging import merge_models
from svdkit.merging.sources import Checkpoint

from conftest import tiny_model

pytestmark = pytest.mark.filterwarnings("ignore")


def finetuned(arch="llama", seed=1, scale=0.01):
    m = tiny_model(arch, 0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return m


def peft_lora(base, seed, rank=4, targets=("q_proj", "v_proj"), alpha=8):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def dense_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    tiny_model("llama", 0).save_pretrained(root / "base")
    for s in (1, 2, 3):
        finetuned(seed=s).save_pretrained(root / f"ft{s}")
    return root


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_folder_merge_streams_into_shards_that_transformers_loads_and_equals_the_in_memory_merge(dense_dirs):
    import transformers as tf

    before = {name: digest(dense_dirs / name) for name in ("base", "ft1", "ft2", "ft3")}
    cfg = svdkit.config("tsv-m", alpha=0.9)
    out = merge_models(str(dense_dirs / "base"), [str(dense_dirs / f"ft{s}") for s in (1, 2, 3)], cfg,
                       weights=[1.0, 0.5, 1.0], out=dense_dirs / "out", shard_size="60KB", progress=False)  # fmt: skip
    assert (out / "model.safetensors.index.json").is_file() and len(json.loads((out / "svdkit_merge.json").read_text())["shards"]) > 1
    loaded = tf.AutoModelForCausalLM.from_pretrained(str(out))
    base, fts = tiny_model("llama", 0), [finetuned(seed=s) for s in (1, 2, 3)]
    base_state, ft_states = state(base), [state(m) for m in fts]
    mem = merge_models(base, fts, cfg, weights=[1.0, 0.5, 1.0], progress=False)
    for key, value in mem.state_dict().items():
        assert torch.allclose(loaded.state_dict()[key], value, atol=1e-6), key
    ref = cfg.merge([ft_states[i]["model.layers.0.mlp.up_proj.weight"] - base_state["model.layers.0.mlp.up_proj.weight"]
                     for i in range(3)], [1.0, 0.5, 1.0])  # fmt: skip
    assert torch.allclose(mem.model.layers[0].mlp.up_proj.weight - base_state["model.layers.0.mlp.up_proj.weight"], ref, atol=1e-5)
    assert all(torch.equal(base.state_dict()[k], v) for k, v in base_state.items())  # inputs untouched
    assert all(torch.equal(fts[0].state_dict()[k], v) for k, v in ft_states[0].items())
    assert before == {name: digest(dense_dirs / name) for name in ("base", "ft1", "ft2", "ft3")}
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loaded(input_ids=ids).logits).all()


def test_peak_memory_is_a_few_copies_of_the_largest_tensor(dense_dirs, monkeypatch):
    """Live tensors read from the checkpoints never exceed (T + 1) copies of the largest one."""
    live, peak, original = {}, [0], Checkpoint.get

    def tracked(self, key):
        t = original(self, key)
        live[id(t)] = t.numel() * t.element_size()
        weakref.finalize(t, live.pop, id(t), None)
        peak[0] = max(peak[0], sum(live.values()))
        return t

    monkeypatch.setattr(Checkpoint, "get", tracked)
    merge_models(str(dense_dirs / "base"), [str(dense_dirs / f"ft{s}") for s in (1, 2, 3)], svdkit.config("iso-cts"),
                 out=dense_dirs / "peak", progress=False)  # fmt: skip
    largest = 128 * 32 * 4  # the embedding, fp32
    total = sum(p.stat().st_size for p in (dense_dirs / "base").glob("*.safetensors"))
    assert 0 < peak[0] <= 4 * largest < 4 * total


def test_lora_inputs_peft_and_svdkit_adapter_merge_as_their_dense_updates(tmp_path):
    base = tiny_model("llama", 0)
    base.save_pretrained(tmp_path / "base")
    a = peft_lora(base, 1)
    a.save_pretrained(tmp_path / "peft_a")
    dense_a = a.merge_and_unload()
    b = svdkit.adapt(copy.deepcopy(base), svdkit.config("pissa", rank=2, targets="attention"))
    with torch.no_grad():
        for p in b.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
    svdkit.save_adapter(b, tmp_path / "svd_b")
    dense_b = svdkit.merge(b)
    full_c = finetuned(seed=3)
    d = svdkit.adapt(copy.deepcopy(base), svdkit.config("full", targets="mlp"))  # a full-rank update: read densely
    with torch.no_grad():
        for p in d.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(4)))
    svdkit.save_adapter(d, tmp_path / "full_d")
    dense_d = svdkit.merge(d)
    cfg = svdkit.config("task-arithmetic", alpha=1.0)
    got = merge_models(str(tmp_path / "base"), [str(tmp_path / "peft_a"), str(tmp_path / "svd_b"), full_c, str(tmp_path / "full_d")],
                       cfg, progress=False)  # fmt: skip
    ref = merge_models(base, [dense_a, dense_b, full_c, dense_d], cfg, progress=False)
    for key, value in ref.state_dict().items():
        assert torch.allclose(got.state_dict()[key], value, atol=1e-5), key


def test_core_space_merges_loras_without_densifying_and_writes_an_exact_peft_lora(tmp_path):
    from peft import PeftModel

    base = tiny_model("llama", 0)
    base.save_pretrained(tmp_path / "base")
    for s, r in ((1, 2), (2, 4)):  # heterogeneous ranks
        peft_lora(base, s, rank=r, alpha=2 * r).save_pretrained(tmp_path / f"lora{s}")
    cfg = svdkit.config("core-space", inner="tsv-m", alpha=0.8)
    out = merge_models(str(tmp_path / "base"), [str(tmp_path / "lora1"), str(tmp_path / "lora2")], cfg,
                       out=tmp_path / "merged", lora_out=True, progress=False)  # fmt: skip
    report = json.loads((out / "svdkit_merge.json").read_text())
    assert report["lora"]["exact"] and report["lora"]["modules"] == 4
    import transformers as tf

    dense = tf.AutoModelForCausalLM.from_pretrained(str(out))
    via_lora = PeftModel.from_pretrained(tiny_model("llama", 0), str(out / "lora")).merge_and_unload()
    for key, value in dense.state_dict().items():
        assert torch.allclose(via_lora.state_dict()[key], value, atol=1e-5), key
    # lossless: with task arithmetic inside, core space is exactly the sum of the LoRAs
    ta = merge_models(str(tmp_path / "base"), [str(tmp_path / "lora1"), str(tmp_path / "lora2")], svdkit.config("task-arithmetic"), progress=False)
    cs = merge_models(str(tmp_path / "base"), [str(tmp_path / "lora1"), str(tmp_path / "lora2")], svdkit.config("core-space"), progress=False)
    for key, value in ta.state_dict().items():
        assert torch.allclose(cs.state_dict()[key], value, atol=1e-5), key


def test_gpt2_conv1d_loras_merge_in_the_stored_orientation(tmp_path):
    base = tiny_model("gpt2", 0)
    base.save_pretrained(tmp_path / "base")
    loras = [peft_lora(base, s, targets=("c_attn", "c_proj")) for s in (1, 2)]
    for i, m in enumerate(loras):
        m.save_pretrained(tmp_path / f"l{i}")
    got = merge_models(str(tmp_path / "base"), [str(tmp_path / "l0"), str(tmp_path / "l1")], svdkit.config("iso-c"), progress=False)
    ref = merge_models(base, [m.merge_and_unload() for m in loras], svdkit.config("iso-c"), progress=False)
    for key, value in ref.state_dict().items():
        assert torch.allclose(got.state_dict()[key], value, atol=1e-5), key


def test_lore_is_base_free(dense_dirs):
    fts = [str(dense_dirs / f"ft{s}") for s in (1, 2, 3)]
    merged = merge_models(None, fts, svdkit.config("lore", iterations=2), progress=False)
    avg = [finetuned(seed=s).model.norm.weight for s in (1, 2, 3)]
    assert torch.allclose(merged.model.norm.weight, sum(avg) / 3, atol=1e-6)
    with pytest.raises(ValueError, match="needs the base model"):
        merge_models(None, fts, svdkit.config("tsv-m"), progress=False)


def test_bad_inputs_fail_with_errors_naming_the_problem(dense_dirs, tmp_path):
    base, fts = str(dense_dirs / "base"), [str(dense_dirs / f"ft{s}") for s in (1, 2)]
    with pytest.raises(ValueError, match="at least 2"):
        merge_models(base, fts[:1], svdkit.config("tsv-m"), progress=False)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        svdkit.config("iso-c", alpha=-1.0)
    tiny_model("gpt2", 0).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="different architectures|different tensors"):
        merge_models(base, [fts[0], str(tmp_path / "gpt2")], svdkit.config("ties"), progress=False)
    other = tiny_model("llama-mha", 0)  # k/v projections 32×32 instead of 16×32
    with pytest.raises(ValueError, match=r"k_proj.weight.*shape"):
        merge_models(base, [fts[0], other], svdkit.config("ties"), progress=False)
    with pytest.raises(ValueError, match="weights must be 2"):
        merge_models(base, fts, svdkit.config("ties"), weights=[1.0], progress=False)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="already exists"):
        merge_models(base, fts, svdkit.config("ties"), out=tmp_path / "taken", progress=False)
    with pytest.raises(FileExistsError, match="did not write it"):
        merge_models(base, fts, svdkit.config("ties"), out=tmp_path / "taken", overwrite=True, progress=False)
    assert (tmp_path / "taken" / "mine.txt").read_text() == "user data"
    with pytest.raises(ValueError, match="inputs are never modified"):
        merge_models(base, fts, svdkit.config("ties"), out=fts[0], overwrite=True, progress=False)


def test_an_adapter_made_on_another_base_is_refused(tmp_path):
    b = svdkit.adapt(tiny_model("llama", 5), svdkit.config("pissa", rank=2, targets="attention"))
    svdkit.save_adapter(b, tmp_path / "adapter")
    tiny_model("llama", 0).save_pretrained(tmp_path / "base")
    with pytest.raises(svdkit.FingerprintMismatch, match="q_proj"):
        merge_models(str(tmp_path / "base"), [str(tmp_path / "adapter"), str(tmp_path / "adapter")], svdkit.config("ties"), progress=False)
    bad = peft_lora(tiny_model("llama-mha", 0), 1, targets=("k_proj",))
    bad.save_pretrained(tmp_path / "bad_peft")
    with pytest.raises(ValueError, match="different base model"):
        merge_models(str(tmp_path / "base"), [str(tmp_path / "bad_peft")], svdkit.config("ties"), progress=False)


def test_cli_merge_writes_a_loadable_folder_with_the_recipe(dense_dirs, tmp_path, capsys):
    import transformers as tf

    from svdkit.cli import main

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"method: ties\nbase: {dense_dirs / 'base'}\nmodels:\n  - model: {dense_dirs / 'ft1'}\n    weight: 1.0\n"
                      f"  - model: {dense_dirs / 'ft2'}\n    parameters: {{weight: 0.5}}\nparameters: {{density: 0.5, alpha: 0.9}}\n")  # fmt: skip
    assert main(["merge", str(recipe), "--out", str(tmp_path / "out")]) == 0
    assert "svdkit merge: ties of 2 models" in capsys.readouterr().out
    out = tmp_path / "out"
    assert (out / "merge.yaml").read_text() == recipe.read_text() and (out / "README.md").is_file()
    model = tf.AutoModelForCausalLM.from_pretrained(str(out))
    ref = merge_models(tiny_model("llama", 0), [finetuned(seed=1), finetuned(seed=2)], svdkit.config("ties", density=0.5, alpha=0.9),
                       weights=[1.0, 0.5], progress=False)  # fmt: skip
    assert torch.allclose(model.model.layers[1].self_attn.o_proj.weight, ref.model.layers[1].self_attn.o_proj.weight, atol=1e-6)
    assert main(["merge", str(recipe), "--out", str(tmp_path / "out")]) == 2  # refused: exists
    assert main(["merge", str(recipe), "--out", str(tmp_path / "out"), "--overwrite"]) == 0
    recipe.write_text("method: ties\nmodels: [a]\nparameters: {densty: 0.5}\n")
    assert main(["merge", str(recipe), "--out", str(tmp_path / "o2")]) == 2


def test_whole_model_ties_thresholds_come_from_a_first_streamed_pass(dense_dirs):
    base, fts = tiny_model("llama", 0), [finetuned(seed=s) for s in (1, 2)]
    cfg = svdkit.config("ties", density=0.3, topk_scope="model")
    merged = merge_models(str(dense_dirs / "base"), [str(dense_dirs / "ft1"), str(dense_dirs / "ft2")], cfg, progress=False)
    keys = list(base.state_dict())
    taus = [[m.state_dict()[k] - base.state_dict()[k] for k in keys] for m in fts]
    thresholds = [float(torch.cat([t.abs().flatten() for t in task]).sort(descending=True).values[int(0.3 * sum(t.numel() for t in task)) - 1])
                  for task in taus]  # fmt: skip
    for i, k in enumerate(keys):
        trimmed = torch.stack([taus[t][i] * (taus[t][i].abs() >= thresholds[t]) for t in range(2)])
        sign = torch.where(trimmed.sum(0) >= 0, 1.0, -1.0)
        agree = (trimmed.sign() == sign).float()
        ref = base.state_dict()[k] + (trimmed * agree).sum(0) / agree.sum(0).clamp_min(1)
        assert torch.allclose(merged.state_dict()[k], ref, atol=1e-6), k
