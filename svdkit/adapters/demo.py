"""The end-to-end check on a real model: adapt, verify the function, train a few steps, save, export,
reload in PEFT, merge. ``svdkit demo`` runs it; every step's numerical check lands in ``report.json``."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from svdkit.adapters.api import adapt, merge
from svdkit.core.registry import config
from svdkit.adapters.export import export_peft
from svdkit.core.files import atomic_dir
from svdkit.core.models import load_model
from svdkit.adapters.saving import load_adapter, save_adapter

PROMPTS = [
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "Singular value decomposition factors a matrix into rotations and a scaling.",
    "A good cup of tea needs water that has just come to the boil.",
    "The river flows past the old mill and into the quiet lake.",
]
TOLERANCE = 1e-4  # relative to the largest logit, fp32


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _peft_logits(model_name: str, peft_dir: Path, batch: dict) -> torch.Tensor | None:
    try:
        from peft import PeftModel
    except ImportError:
        return None
    base, _ = load_model(model_name)
    with torch.no_grad():
        return PeftModel.from_pretrained(base, str(peft_dir)).eval()(**batch).logits


def run_demo(
    out: str | Path = "runs/demo", *, model: str = "default", method: str = "pissa", rank: int = 16,
    svd: str = "exact", targets: str = "all-linear", steps: int = 5, lr: float = 1e-3,
    overwrite: bool = False, log=print,
) -> dict:  # fmt: skip
    """Run the demo and write ``adapter/``, ``peft/`` and ``report.json`` into ``out`` (atomically)."""
    cfg = config(method, rank=rank, svd=svd, targets=targets)
    net, tok = load_model(model)
    if tok is None:
        raise ValueError(f"the demo needs a tokenizer; {model} has none.")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    batch = dict(tok(PROMPTS, return_tensors="pt", padding=True))
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    report: dict = {"model": model, "config": cfg.to_dict(), "tolerance": TOLERANCE}
    with atomic_dir(out, overwrite) as tmp:
        net.eval()
        with torch.no_grad():
            y0 = net(**batch).logits
        t = time.perf_counter()
        adapt(net, cfg)
        report["init_seconds"] = round(time.perf_counter() - t, 3)
        with torch.no_grad():
            report["init_error"] = _rel(net(**batch).logits, y0)
        log(f"adapted with {cfg.name} rank {rank} ({svd} SVD) in {report['init_seconds']} s; "
            f"init changes the logits by {report['init_error']:.2e} (relative)")  # fmt: skip
        trainable = [p for p in net.parameters() if p.requires_grad]
        report["trainable_parameters"] = sum(p.numel() for p in trainable)
        opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
        losses = []
        for _ in range(steps):
            loss = net(**batch, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(round(loss.item(), 4))
        report["train_losses"] = losses
        log(f"{steps} AdamW steps on the demo prompts: loss {losses[0]} -> {losses[-1]}")
        with torch.no_grad():
            y_trained = net(**batch).logits
        save_adapter(net, tmp / "adapter")
        export_peft(net, tmp / "peft")
        fresh, _ = load_model(model)
        load_adapter(fresh, tmp / "adapter")
        with torch.no_grad():
            report["reload_error"] = _rel(fresh(**batch).logits, y_trained)
        y_peft = _peft_logits(model, tmp / "peft", batch)
        report["peft_error"] = None if y_peft is None else _rel(y_peft, y_trained)
        merge(net)
        with torch.no_grad():
            report["merge_error"] = _rel(net(**batch).logits, y_trained)
        checks = {k: report[k] for k in ("init_error", "reload_error", "peft_error", "merge_error")}
        report["passed"] = all(v is None or v <= TOLERANCE for v in checks.values())
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    for key, value in checks.items():
        log(f"  {key:13s} {'(peft not installed)' if value is None else f'{value:.2e}'}")
    log(f"{'PASS' if report['passed'] else 'FAIL'}: wrote {out}/adapter, {out}/peft and {out}/report.json")
    return report
