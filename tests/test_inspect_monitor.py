"""The spectral-alignment monitor: its statistic against a direct computation, and a warning that precedes a
loss explosion provoked by a too-high learning rate on a tiny model (and none on a stable run)."""

from __future__ import annotations

import math

import pytest
import torch

import svdkit
from svdkit.inspection.monitor import SpectralMonitor
from svdkit.inspection.signals import _token_loss
from tests.conftest import VOCAB, perturb_adapters, tiny_model


def _train(lr_start: float, lr_end: float, steps: int):
    """Full fine-tuning of the tiny Llama on arithmetic progressions (learnable), the lr growing geometrically;
    returns (losses, the monitor's records, the step it warned at)."""
    torch.manual_seed(0)
    model = tiny_model("llama").train()
    warnings = []
    monitor = SpectralMonitor(model, log=warnings.append)
    opt = torch.optim.AdamW(model.parameters(), lr=lr_start)
    start = torch.randint(0, VOCAB, (256, 1), generator=torch.Generator().manual_seed(0))
    data = (start + torch.arange(24) * 3) % VOCAB
    losses, records = [], []
    for step in range(1, steps + 1):
        for group in opt.param_groups:
            group["lr"] = lr_start * (lr_end / lr_start) ** ((step - 1) / max(1, steps - 1))
        i = (step * 8) % 256
        loss = _token_loss(model, {"input_ids": data[i : i + 8]})
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        records.append(monitor.after_step(step))
    monitor.close()
    assert len(warnings) == (monitor.warned_at is not None)  # one message, at the first warning
    return losses, records, monitor.warned_at


def test_warning_precedes_a_provoked_loss_explosion():
    losses, records, warned = _train(1e-3, 3.0, 32)
    blowup = next((i + 1 for i, v in enumerate(losses) if not math.isfinite(v) or v > losses[0]), None)
    assert blowup is not None and min(losses[:blowup]) < 0.5 * losses[0]  # it learned, then exploded
    assert warned is not None and warned < blowup, (warned, blowup, losses)
    assert records[warned - 1]["spectral_warning"] and records[warned - 1]["sa_min_diversity"] < 0.35


def test_no_warning_on_a_stable_run():
    losses, records, warned = _train(1e-3, 1e-3, 14)
    assert warned is None and losses[-1] < losses[0]
    assert all("spectral_warning" not in r for r in records) and all(r["sa_sign_diversity"] > 0.5 for r in records)


def test_alignment_statistic_and_adapter_sigma_match_a_direct_computation():
    model = tiny_model("llama")
    svdkit.adapt(model, svdkit.config("lora", rank=4))
    perturb_adapters(model, scale=0.2)
    model.train()
    monitor = SpectralMonitor(model, power_steps=200, max_tokens=1000)
    layer = model.model.layers[0].self_attn.q_proj
    W = layer.merged_weight().detach().double()
    v1 = torch.linalg.svd(W).Vh[0]
    assert abs(float(monitor.v1["model.layers.0.self_attn.q_proj"] @ v1)) == pytest.approx(1.0, abs=1e-6)
    seen = {}
    def record(module, args):  # returns None: the input is left as it is
        seen.setdefault("x", args[0].detach().reshape(-1, 32).double())

    handle = layer.register_forward_pre_hook(record)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.enable_grad():
        model(input_ids=ids)
    handle.remove()
    v = monitor.v1["model.layers.0.self_attn.q_proj"]
    p = float(((seen["x"] @ v) > 0).double().mean())
    out = monitor.after_step(1)
    assert out["sa_min_diversity"] <= 2 * min(p, 1 - p) + 1e-12
    assert out["sa_min_layer"] != "model.layers.0.self_attn.q_proj" or out["sa_min_diversity"] == pytest.approx(2 * min(p, 1 - p))
    sigma = max(float(torch.linalg.svdvals(m.delta_weight().detach().double())[0]) for _, m in svdkit.adapters.api.adapted_layers(model))
    assert out["adapter_sigma_max"] == pytest.approx(sigma, rel=1e-6)
    with pytest.raises(ValueError, match="threshold"):
        SpectralMonitor(model, threshold=1.5)


def test_finetune_monitor_spectral_logs_into_metrics(tiny_run_inputs, tmp_path):
    import json

    from svdkit.training.finetune import FinetuneConfig, finetune

    model_dir, data_file = tiny_run_inputs
    cfg = FinetuneConfig(model=str(model_dir), data=str(data_file), method="lora", rank=4, steps=3, batch_size=4,
                         eval_every=3, checkpoint_every=3, samples=0, max_heldout=4, monitor="spectral")  # fmt: skip
    finetune(cfg, tmp_path / "run", progress=False, log=lambda s: None)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all({"sa_sign_diversity", "sa_min_diversity", "adapter_sigma_max"} <= set(r) for r in rows)
    assert rows[-1]["adapter_sigma_max"] > 0
    with pytest.raises(ValueError, match="monitor"):
        FinetuneConfig(monitor="loud")
