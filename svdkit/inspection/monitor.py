"""`svdkit finetune --monitor spectral`: spectral alignment per layer and the adapter update's top σ, with a
warning before a loss explosion.

Spectral alignment (Qiu, Wu, Tan, Wang, Yao 2025, "Spectral Alignment as Predictor of Loss Explosion in
Neural Network Training", https://arxiv.org/abs/2510.04202): for a layer with weight W (out × in) and
principal right singular vector v₁, each input token x_t has the alignment a_t = ⟨x_t, v₁⟩ / ‖x_t‖. The
paper monitors the distribution of a_t over tokens; a collapse of its *sign diversity* (almost every token
on the same side of v₁, so W's top direction amplifies all of them coherently) precedes representational
collapse and the loss explosion. The exact statistic of the paper was not available to us; we use the
sign diversity d = 2·min(p, 1 − p), p = share of tokens with a_t > 0 (d = 1: balanced signs, d = 0: all
one sign), and the mean |a_t|. A layer is *collapsing* when d < ``threshold`` for ``patience`` consecutive
steps; the monitor warns (once, then flags every step) when any layer is. Defaults 0.35 and 2 were chosen on
the provoked divergence of tests/test_inspect_monitor.py (a tiny Llama whose learning rate grows
geometrically: the first layer falls below 0.35 two to three steps before the loss passes its initial
value, while a stable run never does); they are a heuristic, not a guarantee, and other models may need
other values.

v₁ is tracked by power iteration on WᵀW warm-started from the previous step's v₁ (``power_steps`` products
with W per step, O(mn), no SVD); the adapter update's σ₁(ΔW) comes from its factors
(:func:`svdkit.inspection.spectrum.delta_spectrum`). Monitored layers: the svdkit adapter layers, or every
plain linear but the output head for a model without adapters. Each training forward (grad enabled, module
in train mode) contributes at most ``max_tokens`` tokens per layer (the first of the flattened batch);
evaluation passes are ignored.
"""

from __future__ import annotations

import statistics

import torch
from torch import nn

from svdkit.adapters.layers import SpectralLinear, weight_matrix
from svdkit.core.targets import is_conv1d
from svdkit.inspection.spectrum import _svdkit_matrix, delta_spectrum


class SpectralMonitor:
    """Forward hooks that read the layers' inputs; :meth:`after_step` turns them into a metrics record."""

    def __init__(self, model: nn.Module, *, threshold: float = 0.35, patience: int = 2, max_tokens: int = 256,
                 power_steps: int = 2, log=print, seed: int = 0):  # fmt: skip
        if not 0 < threshold < 1 or patience < 1:
            raise ValueError(f"threshold must be in (0, 1) and patience ≥ 1; got {threshold}, {patience}.")
        self.threshold, self.patience, self.max_tokens, self.power_steps, self.log = threshold, patience, max_tokens, power_steps, log
        adapted = [(n, m) for n, m in model.named_modules() if isinstance(m, SpectralLinear)]
        if adapted:
            self.layers = adapted
        else:
            get = getattr(model, "get_output_embeddings", None)
            head = get() if callable(get) else None
            self.layers = [(n, m) for n, m in model.named_modules() if (isinstance(m, nn.Linear) or is_conv1d(m)) and m is not head]
        if not self.layers:
            raise ValueError("--monitor spectral: the model has no linear layer to monitor.")
        g = torch.Generator().manual_seed(seed)
        self.v1 = {n: nn.functional.normalize(torch.randn(self._weight(m).shape[1], generator=g, dtype=torch.float64), dim=0)
                   for n, m in self.layers}  # fmt: skip
        self.counts = {n: [0, 0, 0.0] for n, _ in self.layers}  # tokens, positive, Σ|a|
        self.streak = {n: 0 for n, _ in self.layers}  # consecutive steps below the threshold
        self.handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in self.layers]
        self.warned_at: int | None = None
        self._refresh()

    @staticmethod
    def _weight(module: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return (module.merged_weight() if isinstance(module, SpectralLinear) else weight_matrix(module)).detach()

    def _refresh(self) -> None:
        """Advance each layer's v₁ by ``power_steps`` power iterations on WᵀW (W as it is now)."""
        for name, module in self.layers:
            W = self._weight(module).to(torch.float64)
            v = self.v1[name].to(W.device)
            for _ in range(self.power_steps):
                v = nn.functional.normalize(W.T @ (W @ v), dim=0)
            self.v1[name] = v

    def _hook(self, name: str):
        def hook(module, args):
            if not torch.is_grad_enabled() or not module.training:  # evaluation passes are not training inputs
                return
            x = args[0].detach().reshape(-1, args[0].shape[-1])[: self.max_tokens].to(torch.float64)
            a = (x @ self.v1[name].to(x.device)) / x.norm(dim=1).clamp_min(1e-30)
            c = self.counts[name]
            c[0] += a.numel()
            c[1] += int((a > 0).sum())
            c[2] += float(a.abs().sum())

        return hook

    def after_step(self, step: int) -> dict:
        """The step's record (merged into metrics.jsonl): median sign diversity, the share of collapsed layers,
        the lowest layer's, the share below the threshold, the mean |alignment|, the largest adapter σ₁(ΔW), and
        ``spectral_warning`` while a layer is collapsing."""
        diversity, mean_abs = {}, []
        for name, (n, pos, total) in self.counts.items():
            if n:
                p = pos / n
                diversity[name] = 2 * min(p, 1 - p)
                mean_abs.append(total / n)
        self.counts = {n: [0, 0, 0.0] for n, _ in self.layers}
        record = {}
        if diversity:
            for name in self.streak:
                self.streak[name] = self.streak[name] + 1 if diversity.get(name, 1.0) < self.threshold else 0
            worst = min(diversity, key=diversity.get)
            record = {"sa_sign_diversity": round(statistics.median(diversity.values()), 4),
                      "sa_min_diversity": round(diversity[worst], 4), "sa_min_layer": worst,
                      "sa_collapsed_share": round(sum(d < self.threshold for d in diversity.values()) / len(diversity), 4),
                      "sa_abs_mean": round(statistics.mean(mean_abs), 4)}  # fmt: skip
            collapsing = [n for n, k in self.streak.items() if k >= self.patience]
            if collapsing:
                record["spectral_warning"] = True
                if self.warned_at is None:
                    self.warned_at = step
                    self.log(f"svdkit: warning at step {step}: the spectral alignment of {', '.join(collapsing)} has lost "
                             f"its sign diversity (< {self.threshold} for {self.patience} steps; arXiv 2510.04202): a loss "
                             "explosion may follow — consider a lower learning rate or an earlier checkpoint.")  # fmt: skip
        sigmas = [float(delta_spectrum(m, m.base, m.weight.device)[0]) for m in self._adapter_matrices()]
        if sigmas:
            record["adapter_sigma_max"] = round(max(sigmas), 6)
        self._refresh()
        return record

    def _adapter_matrices(self):
        for name, module in self.layers:
            if isinstance(module, SpectralLinear):
                yield _svdkit_matrix(name, module)

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
