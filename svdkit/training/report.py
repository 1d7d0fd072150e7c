"""What a fine-tuning run shows a person: metrics.jsonl, loss.png, samples.md and the final summary."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from svdkit.core.files import write_text


def append_metrics(path: Path, row: dict) -> None:
    """Append one JSON line with a single O_APPEND write (a kill can tear only this line, which
    :func:`read_metrics` then skips); a torn line left by an earlier kill is first ended."""
    line = (json.dumps(row) + "\n").encode()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if os.fstat(fd).st_size and os.pread(fd, 1, os.fstat(fd).st_size - 1) != b"\n":
            line = b"\n" + line
        os.write(fd, line)
    finally:
        os.close(fd)


def read_metrics(path: Path) -> list[dict]:
    """The rows of metrics.jsonl. A row cut short (a run killed mid-write: it starts with ``{`` but does not
    end with ``}``) is skipped; any other line that is not JSON is an error naming it."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            torn = line.startswith("{") and not line.rstrip().endswith("}")  # a row cut short by a kill
            if not torn:
                raise ValueError(f"{path}: line {i + 1} is not JSON ({line[:60]!r}); the metrics file is corrupt.") from None
    return rows


def truncate_metrics(path: Path, step: int) -> None:
    """Drop rows after ``step`` (logged after the checkpoint a run resumes from)."""
    rows = [r for r in read_metrics(path) if r["step"] <= step]
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def prompt_ids(item: dict) -> list[int]:
    """The part of an example before its first labelled token (the prompt), or its first 16 tokens."""
    labels = item["labels"]
    first = next((i for i, v in enumerate(labels) if v != -100), 0)
    return item["input_ids"][: first if first > 0 else min(16, len(labels) // 2 or 1)]


@torch.no_grad()
def generate(model, tok, items: list[dict], max_new_tokens: int = 40) -> list[str]:
    """Greedy continuations of each example's prompt."""
    was_training = model.training
    model.eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    outs = []
    for item in items:
        ids = torch.tensor([prompt_ids(item)])
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad)  # fmt: skip
        outs.append(tok.decode(gen[0, ids.shape[1] :], skip_special_tokens=True).strip())
    model.train(was_training)
    return outs


def write_samples(path: Path, items: list[dict], tok, before: list[str], after: list[str]) -> None:
    parts = ["# Samples: greedy continuations of held-out prompts, before and after fine-tuning\n"]
    for i, (item, b, a) in enumerate(zip(items, before, after), 1):
        prompt = tok.decode(prompt_ids(item), skip_special_tokens=True).strip()
        reference = tok.decode([t for t in item["labels"] if t != -100], skip_special_tokens=True).strip()
        parts.append(f"## {i}\n\n**Prompt:** {prompt}\n\n**Reference:** {reference}\n\n"
                     f"**Before:** {b}\n\n**After:** {a}\n")  # fmt: skip
    write_text(path, "\n".join(parts))


def plot_losses(metrics: Path, png: Path, before: float | None = None) -> None:
    """loss.png: training loss per step and held-out loss at each evaluation (``before``: at step 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train", lw=1)
    held = ([] if before is None else [{"step": 0, "heldout_loss": before}]) + [r for r in rows if "heldout_loss" in r]
    ax.plot([r["step"] for r in held], [r["heldout_loss"] for r in held], "o-", label="held-out")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title=f"svdkit finetune: {metrics.parent.name}")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = png.with_name(f".{png.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(png)


def train_stats(rows: list[dict]) -> dict:
    """Training time (sum and median of the step times) and the mean loss of the last 10 steps."""
    import statistics

    times, losses = [r["step_s"] for r in rows if "step_s" in r], [r["loss"] for r in rows[-10:]]
    return {"seconds": round(sum(times), 1), "median_step_s": round(statistics.median(times), 3) if times else None,
            "last_10_loss": statistics.fmean(losses) if losses else None}  # fmt: skip


def summary_text(out: Path, s: dict, merged: bool, peft: bool = True) -> str:
    b, a, t = s["before"], s["after"], s["train"]
    lines = [
        f"svdkit finetune: {s['method']} rank {s['rank']}, {s['steps']} steps, lr {s['lr']:g}, "
        f"{s['trainable_parameters']:,} trainable parameters",
        f"training       {t['seconds']:.0f} s in steps ({t['median_step_s']} s/step median); "
        f"train loss of the last 10 steps {t['last_10_loss']:.4f}",
        f"held-out loss  {b['loss']:.4f} -> {a['loss']:.4f}   perplexity {b['perplexity']:.2f} -> {a['perplexity']:.2f}"
        f"   ({s['heldout_examples']} examples)",
        f"wrote {out}/: config.json metrics.jsonl loss.png eval.json samples.md adapter/ "
        + ("peft/ " if peft else "")
        + "checkpoint/"
        + (" merged/" if merged else ""),
        f"samples before/after: {out}/samples.md    curves: {out}/loss.png",
        f"load with PEFT: PeftModel.from_pretrained(base, '{out}/peft')" if peft else
        f"{s['method']}'s update is not low-rank, so there is no PEFT LoRA export: ship the merged model ("
        + (f"{out}/merged)" if merged else "rerun with --merge)"),
    ]
    return "\n".join(lines)
