"""Spectral signals that need data: gradient spectra and the matrix nuclear norm of the outputs.

    rows = svdkit.gradient_spectrum(model, batches)    # per layer: nuclear norm, effective rank of ∇W
    score = svdkit.nuclear_norm_score(model, batches)  # matrix nuclear norm of the output probabilities

Gradient spectra (Li et al. 2025, "How Instruction and Reasoning Data Shape Post-Training: Data Quality
through a Layer-wise Gradient Lens", https://arxiv.org/abs/2504.10766): for each batch b and linear
layer l, G = ∇_W L_b (out × in) of the mean token cross-entropy; N = ‖G‖_* = Σσ_j and the effective rank
exp(−Σ σ̃_j ln σ̃_j), σ̃ = σ/Σσ. Reported as means over the batches (batch size 1 gives the paper's
per-example statistic). Lower nuclear norm and higher effective rank indicate higher-quality data, so two
datasets are compared by running this on each. Plain ``nn.Linear``/``Conv1D`` weights only (merge an
adapter first); the weights' ``requires_grad`` flags are restored afterwards.

Matrix nuclear norm (Li, Xia, Wu, Chang, Findings of EMNLP 2025, https://arxiv.org/abs/2410.10672): for a
sequence of T tokens, R (T × d) is the model's output matrix — here the softmax probabilities over the
vocabulary (``source="probabilities"``) or the last hidden states (``source="hidden"``, the paper's
released code); R is centered over tokens and each row scaled to unit norm; ‖R‖_* is approximated by the
L₁,₂ norm, the sum of the D = min(T, d) largest column ℓ₂ norms, and divided by T. Both that
approximation (``mnn``) and the exact nuclear norm / T (``mnn_exact``) are returned, averaged over sequences.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from svdkit.core.linalg_rank import effective_rank
from svdkit.core.linalg_spectrum import gram_eigenvalues
from svdkit.core.targets import is_conv1d


def _labels(batch: dict) -> torch.Tensor:
    if "labels" in batch:
        return batch["labels"]
    mask = batch.get("attention_mask")
    return batch["input_ids"] if mask is None else batch["input_ids"].masked_fill(mask == 0, -100)


def _token_loss(model, batch: dict) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled positions."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
    logits = out.logits[:, :-1].float()
    labels = _labels(batch)[:, 1:]
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


def gradient_spectrum(model: nn.Module, batches, *, loss=None, progress: bool | None = None) -> list[dict]:
    """Per plain linear layer: mean over ``batches`` of ‖∇W‖_*, the effective rank and ‖∇W‖_F of the gradient
    of ``loss(model, batch)`` (default: mean token cross-entropy; batches hold input_ids, attention_mask and
    optionally labels with -100 for ignored positions). The model's parameters are not changed."""
    from tqdm.auto import tqdm

    loss = loss or _token_loss
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) or is_conv1d(m)]
    if not layers:
        raise ValueError("gradient_spectrum: the model has no plain nn.Linear/Conv1D layer (merge adapters first).")
    flags = {id(p): p.requires_grad for p in model.parameters()}
    sums: dict[str, list[float]] = {n: [0.0, 0.0, 0.0] for n, _ in layers}
    count = 0
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for _, m in layers:
            m.weight.requires_grad_(True)
        for batch in tqdm(list(batches), desc="svdkit gradient spectrum", disable=None if progress is None else not progress):
            model.zero_grad(set_to_none=True)
            loss(model, batch).backward()
            for name, m in layers:
                g = m.weight.grad
                if g is None:
                    continue
                G = g.T if is_conv1d(m) else g
                S = gram_eigenvalues(G).sqrt()
                acc = sums[name]
                acc[0] += float(S.sum())
                acc[1] += effective_rank(S) if float(S.sum()) > 0 else float("nan")
                acc[2] += float(S.square().sum()) ** 0.5
            count += 1
    finally:
        model.zero_grad(set_to_none=True)
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
    if count == 0:
        raise ValueError("gradient_spectrum: no batches given.")
    return [{"name": n, "grad_nuclear_norm": a[0] / count, "grad_effective_rank": a[1] / count, "grad_fro": a[2] / count,
             "batches": count} for n, a in sums.items()]  # fmt: skip


def matrix_nuclear_norm(R: torch.Tensor) -> tuple[float, float]:
    """(L₁,₂ approximation, exact nuclear norm) of the normalized T × d output matrix, each divided by T."""
    R = R.detach().to(torch.float64)
    R = R - R.mean(dim=0, keepdim=True)
    R = R / R.norm(dim=1, keepdim=True).clamp_min(1e-300)
    T, d = R.shape
    approx = float(R.norm(dim=0).sort(descending=True).values[: min(T, d)].sum())
    exact = float(gram_eigenvalues(R).sqrt().sum())
    return approx / T, exact / T


@torch.no_grad()
def nuclear_norm_score(model: nn.Module, batches, *, source: str = "probabilities") -> dict:
    """Mean over the sequences in ``batches`` of the matrix nuclear norm (see the module docstring)."""
    if source not in ("probabilities", "hidden"):
        raise ValueError(f"source must be 'probabilities' or 'hidden', got {source!r}.")
    approx, exact, n = 0.0, 0.0, 0
    for batch in batches:
        mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"]))
        out = model(input_ids=batch["input_ids"], attention_mask=mask, output_hidden_states=source == "hidden")
        outputs = out.hidden_states[-1] if source == "hidden" else out.logits.float().softmax(-1)
        for row, keep in zip(outputs, mask.bool()):
            if int(keep.sum()) < 2:
                continue
            a, e = matrix_nuclear_norm(row[keep])
            approx, exact, n = approx + a, exact + e, n + 1
    if n == 0:
        raise ValueError("nuclear_norm_score: no sequence with at least 2 tokens in the batches.")
    return {"source": source, "mnn": approx / n, "mnn_exact": exact / n, "sequences": n, "finite": math.isfinite(approx)}
