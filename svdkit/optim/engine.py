"""GaLoreAdamW: Adam whose moments live in a low-rank subspace of each matrix's gradient; plain AdamW for
everything else, in the same ``torch.optim.Optimizer``.

GaLore (Zhao et al. 2024, https://arxiv.org/abs/2403.03507, Alg. 2, Eqs. 10–15). For a weight W (m × n) with
gradient G, let X = G (m ≤ n) or Gᵀ (m > n), s × L with s = min(m, n) (projector on the smaller side):

    every ``update_gap`` steps:  P ← basis(X) (s × r)            (``projection``; on_switch decides the moments)
    R = Pᵀ X                                                     (r × L)
    M ← β1 M + (1 − β1) R,   V ← β2 V + (1 − β2) R²,   N = M̂ / (√V̂ + ε)   (M̂ = M/(1−β1ᵗ), V̂ = V/(1−β2ᵗ))
    W ← (1 − η λ) W − η · scale · (P N)  [transposed back when X = Gᵀ]

Choices (each a param-group option, so groups may differ):
- ``projection``: "svd" (exact top-r left singular vectors, fp32, fp64 retry on non-convergence),
  "randomized" (seeded subspace iteration, GaLore+/GaLore 2), "dct" (top-r DCT-II rows by ℓ1 alignment,
  only the r indices stored), "online-pca" (SVD at the first step, then one Adam step per iteration on the
  online-PCA loss, Online Subspace Descent), "random" (orthonormalized seeded Gaussian, a new one per refresh).
- ``on_switch``: at a refresh the old moments are expressed in the old basis. "keep" leaves them as they are
  (galore-torch), "reset" (the default) zeroes them and restarts bias correction, "rotate" maps them with
  C = P_newᵀ P_old (:func:`svdkit.optim.projection.transport`). Online-PCA's per-step drift always keeps them
  (the paper's rule). The default comes from BENCHMARKS.md's measurement (``benchmarks/pretrain.py --spike``:
  bench-tier pre-training, 2 seeds per rule, same batches): held-out perplexity reset 310 < keep 336 < rotate
  365 (both seeds agree), while the train-loss jump at refreshes did not separate the rules (within 0.006
  nats). "keep" remains an option and reproduces the reference (galore-torch; DESIGN.md §8's example).
- Weight decay is decoupled and applied to the full weight before the update (torch.optim.AdamW's order;
  galore-torch applies it after). Bias correction as torch.optim.AdamW (ε added to √V̂).
- Q-GaLore options: ``lazy_threshold`` (double a layer's refresh gap once ``lazy_queue`` successive refreshes
  had |cos| of first basis vectors ≥ threshold; the queue restarts after each doubling), ``proj_bits``
  (fake-quantized projector), ``weight_bits`` (fake-quantized weights after each update, stochastic rounding
  from a seeded generator per parameter and step). GaLore+ option: ``heads`` > 0 computes the (right,
  input-side) projector of a matrix whose rows are ``heads`` equal head blocks from the block with the largest
  gradient norm only, and shares it across heads (needs rank ≤ rows/heads; otherwise the whole matrix).
  GaLore+'s sparsely coded residual, ``residual_density`` = d > 0: what the projection drops, E = X − P Pᵀ X,
  gets its own Adam on a sparse support Ω (the k = ⌈d·s·L⌉ largest |E| entries, chosen at each refresh
  from that step's gradient and fixed until the next): e = E[Ω] (k,), m_e ← β1 m_e + (1 − β1) e,
  v_e ← β2 v_e + (1 − β2) e², and the update becomes scale · (P N + scatter_Ω(m̂_e / (√v̂_e + ε))).
  Ω's moments restart at every refresh (the residual is relative to P, so its coordinates change with P,
  whatever ``on_switch`` does to the low-rank moments); E[Ω] is computed as X[Ω] − rows of P · columns of
  R (k·r work, E never formed between refreshes). Needs periodic refreshes (not "online-pca").
- State per low-rank matrix: ``exp_avg``/``exp_avg_sq`` (r × L, fp32), ``proj`` (s × r fp32; "dct": ``proj_idx``
  (r,) int64 instead), counters as Python numbers; online-pca adds the projector's own Adam moments (2 s r);
  the residual adds ``res_idx`` (k,) int64 and ``res_avg``/``res_avg_sq`` (k,) fp32 (16 bytes per entry).
  Everything is a tensor or a number, so ``torch.load(weights_only=True)`` + ``load_state_dict`` resumes
  bit-identically (random draws are seeded by (seed, parameter index, refresh count)).
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import Tensor

from svdkit.core import linalg
from svdkit.optim import projection as proj
from svdkit.optim.quant import fake_quantize

DEFAULTS = dict(
    lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, low_rank=None, rank=128, update_gap=200, scale=0.25,
    projection="svd", on_switch="reset", niter=2, seed=0, pca_lr_ratio=5.0, ortho=0.1, lazy_threshold=None,
    lazy_queue=5, proj_bits=None, weight_bits=None, quant_group=256, heads=0, residual_density=0.0,
)  # fmt: skip


class GaLoreAdamW(torch.optim.Optimizer):
    """Low-rank-gradient AdamW (see the module docstring for the update and every option).

    ``params``: parameters or param groups; a group's ``low_rank`` (default: whether the tensor is a matrix)
    decides GaLore vs plain AdamW. Non-matrix parameters always get plain AdamW.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, **options):
        unknown = set(options) - set(DEFAULTS)
        if unknown:
            raise TypeError(f"GaLoreAdamW: unknown option(s) {sorted(unknown)}; valid: {sorted(DEFAULTS)}.")
        super().__init__(params, {**DEFAULTS, **options, "lr": lr})
        for group in self.param_groups:
            _check_group(group)
        self._dct: dict[tuple, Tensor] = {}

    def _index(self) -> dict[int, int]:
        return {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}

    def is_low_rank(self, p: Tensor, group: dict) -> bool:
        return p.ndim == 2 and group["low_rank"] is not False and min(p.shape) > 1

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = self._index()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("GaLoreAdamW does not support sparse gradients.")
                if self.is_low_rank(p, group):
                    self._low_rank_step(p, group, index[id(p)])
                else:
                    self._adamw_step(p, group)
        return loss

    # -- plain AdamW (torch.optim.AdamW's single-tensor update, op for op) ---------------------------------
    def _adamw_step(self, p: Tensor, group: dict) -> None:
        st = self.state[p]
        if not st:
            st.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
        b1, b2 = group["betas"]
        st["step"] += 1
        p.mul_(1 - group["lr"] * group["weight_decay"])
        st["exp_avg"].lerp_(p.grad, 1 - b1)
        st["exp_avg_sq"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
        bc1, bc2 = 1 - b1 ** st["step"], 1 - b2 ** st["step"]
        denom = (st["exp_avg_sq"].sqrt() / math.sqrt(bc2)).add_(group["eps"])
        p.addcdiv_(st["exp_avg"], denom, value=-group["lr"] / bc1)

    # -- GaLore ------------------------------------------------------------------------------------------
    def _low_rank_step(self, p: Tensor, group: dict, i: int) -> None:
        st = self.state[p]
        if not st:
            self._init_state(p, group, st)
        G = p.grad.float()
        X = G.T if st["transposed"] else G
        fresh = "proj" not in st and "proj_idx" not in st
        if fresh or (group["projection"] != "online-pca" and st["step"] >= st["next_refresh"]):
            self._refresh(p, group, st, X, i)
        P = self.projector(p)
        R = P.T @ X  # (r, L)
        b1, b2 = group["betas"]
        st["moment_step"] += 1
        st["exp_avg"].lerp_(R, 1 - b1)
        st["exp_avg_sq"].mul_(b2).addcmul_(R, R, value=1 - b2)
        bc1, bc2 = 1 - b1 ** st["moment_step"], 1 - b2 ** st["moment_step"]
        N = (st["exp_avg"] / bc1) / ((st["exp_avg_sq"] / bc2).sqrt().add_(group["eps"]))
        U = (P @ N).mul_(group["scale"])
        if "res_idx" in st:  # GaLore+'s sparsely coded residual
            U.view(-1).index_add_(0, st["res_idx"], self._residual_step(group, st, X, P, R), alpha=group["scale"])
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_((U.T if st["transposed"] else U).to(p.dtype), alpha=-group["lr"])
        if group["projection"] == "online-pca":
            self._online_pca_step(group, st, X)
        if group["weight_bits"]:
            gen = torch.Generator().manual_seed(linalg.layer_seed(group["seed"], f"w{i}:{st['step']}"))
            p.copy_(fake_quantize(p, group["weight_bits"], group["quant_group"], gen))
        st["step"] += 1

    def _init_state(self, p: Tensor, group: dict, st: dict) -> None:
        m, n = p.shape
        transposed = m > n
        if _head_block(p, group) is not None:
            transposed = True  # GaLore+: the shared projector is on the input side
        s, L = (n, m) if transposed else (m, n)
        r = min(group["rank"], s)
        st.update(step=0, moment_step=0, refreshes=0, transposed=transposed, gap=group["update_gap"], next_refresh=0,
                  cos_queue=[], exp_avg=torch.zeros(r, L, device=p.device), exp_avg_sq=torch.zeros(r, L, device=p.device))  # fmt: skip

    def projector(self, p: Tensor) -> Tensor:
        """The current projector P (s × r, fp32) of low-rank parameter ``p``."""
        st = self.state[p]
        if "proj_idx" in st:
            side = p.shape[1] if st["transposed"] else p.shape[0]
            return self._dct_basis(side, p.device)[st["proj_idx"]].T
        return st["proj"]

    def _dct_basis(self, s: int, device) -> Tensor:
        key = (s, str(device))
        if key not in self._dct:
            self._dct[key] = linalg.dct_matrix(s, torch.float32, device)
        return self._dct[key]

    def _refresh(self, p: Tensor, group: dict, st: dict, X: Tensor, i: int) -> None:
        r = st["exp_avg"].shape[0]
        seed = linalg.layer_seed(group["seed"], f"{i}:{st['refreshes']}")
        old = self.projector(p) if ("proj" in st or "proj_idx" in st) else None
        kind = group["projection"]
        if kind == "dct":
            st["proj_idx"] = proj.dct_select(X, r, self._dct_basis(X.shape[0], X.device))
            new = self.projector(p)
        else:
            if kind == "random":
                new = proj.random_basis(X.shape[0], r, seed, X.device)
            else:
                block = _head_block(p, group)
                source = X if block is None else X.T[block].T  # GaLore+: the strongest head's rows of G
                new = proj.top_left(source, r, "randomized" if kind == "randomized" else "svd", seed, group["niter"])
            if group["proj_bits"]:
                new = fake_quantize(new, group["proj_bits"], group["quant_group"])
            st["proj"] = new.contiguous()
        if group["residual_density"]:
            st["res_idx"] = proj.residual_support(X, self.projector(p), group["residual_density"])
            zeros = torch.zeros(st["res_idx"].numel(), device=X.device)
            st.update(res_avg=zeros, res_avg_sq=zeros.clone(), res_step=0)
        if kind == "online-pca":
            st.update(pca_m=torch.zeros_like(new), pca_v=torch.zeros_like(new), pca_step=0)
        st["refreshes"] += 1
        if old is not None:
            self._switch(group, st, old, new)
        st["next_refresh"] = st["step"] + st["gap"]

    def _switch(self, group: dict, st: dict, old: Tensor, new: Tensor) -> None:
        if group["lazy_threshold"] is not None:  # Q-GaLore's layer-adaptive lazy refresh
            st["cos_queue"].append(proj.cosine_first(old, new))
            if len(st["cos_queue"]) >= group["lazy_queue"]:
                if sum(st["cos_queue"]) / len(st["cos_queue"]) >= group["lazy_threshold"]:
                    st["gap"] *= 2
                st["cos_queue"] = []
        mode, t = group["on_switch"], st["moment_step"]
        if mode == "reset" or (mode == "rotate" and t == 0):
            st["exp_avg"].zero_()
            st["exp_avg_sq"].zero_()
            st["moment_step"] = 0
        elif mode == "rotate":
            b1, b2 = group["betas"]
            m, v = proj.transport(st["exp_avg"], st["exp_avg_sq"], new.T @ old, 1 - b1**t, 1 - b2**t)
            st["exp_avg"].copy_(m)
            st["exp_avg_sq"].copy_(v)

    def _residual_step(self, group: dict, st: dict, X: Tensor, P: Tensor, R: Tensor) -> Tensor:
        """Adam on the residual's support Ω: returns m̂_e / (√v̂_e + ε) (k,), bias-corrected by its own count."""
        e = proj.residual_at(X, P, R, st["res_idx"])
        b1, b2 = group["betas"]
        st["res_step"] += 1
        st["res_avg"].lerp_(e, 1 - b1)
        st["res_avg_sq"].mul_(b2).addcmul_(e, e, value=1 - b2)
        bc1, bc2 = 1 - b1 ** st["res_step"], 1 - b2 ** st["res_step"]
        return (st["res_avg"] / bc1) / ((st["res_avg_sq"] / bc2).sqrt().add_(group["eps"]))

    def _online_pca_step(self, group: dict, st: dict, X: Tensor) -> None:
        """One Adam step on P for the online-PCA loss, lr = pca_lr_ratio · η_t (OSD §5.3: η_P = α η_W, α = 5)."""
        b1, b2 = group["betas"]
        g = proj.online_pca_grad(st["proj"], X, group["ortho"])
        st["pca_step"] += 1
        st["pca_m"].lerp_(g, 1 - b1)
        st["pca_v"].mul_(b2).addcmul_(g, g, value=1 - b2)
        bc1, bc2 = 1 - b1 ** st["pca_step"], 1 - b2 ** st["pca_step"]
        denom = (st["pca_v"] / bc2).sqrt_().add_(group["eps"])
        st["proj"].addcdiv_(st["pca_m"] / bc1, denom, value=-group["pca_lr_ratio"] * group["lr"])

    def load_state_dict(self, state_dict: dict) -> None:
        """torch casts every saved tensor to its parameter's dtype; put the saved dtypes back (int64 DCT
        indices, fp32 moments of lower-precision weights) so a resumed run continues bit-identically."""
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params):
            for key, value in state_dict["state"].get(pid, {}).items():
                if isinstance(value, Tensor) and self.state[p][key].dtype != value.dtype:
                    self.state[p][key] = self.state[p][key].to(value.dtype)


def _head_block(p: Tensor, group: dict) -> slice | None:
    """GaLore+: the rows of the head with the largest gradient norm, when ``heads`` applies to ``p``."""
    heads = group["heads"]
    if not heads or p.shape[0] % heads or group["rank"] > p.shape[0] // heads or p.grad is None:
        return None
    dh = p.shape[0] // heads
    h = int(p.grad.float().view(heads, dh, -1).square().sum(dim=(1, 2)).argmax())
    return slice(h * dh, (h + 1) * dh)


def _check_group(group: dict) -> None:
    if group["projection"] not in proj.PROJECTIONS:
        raise ValueError(f"GaLoreAdamW: projection must be one of {proj.PROJECTIONS}, got {group['projection']!r}.")
    if group["on_switch"] not in proj.ON_SWITCH:
        raise ValueError(f"GaLoreAdamW: on_switch must be one of {proj.ON_SWITCH}, got {group['on_switch']!r}.")
    if not 0 <= group["residual_density"] <= 1:
        raise ValueError(f"GaLoreAdamW: residual_density must be in [0, 1] (0: off), got {group['residual_density']}.")
    if group["residual_density"] and group["projection"] == "online-pca":
        raise ValueError("GaLoreAdamW: residual_density needs a projection with periodic refreshes (its support is chosen "
                         "at each refresh); online-pca never refreshes. Use another projection or residual_density=0.")
    for key in ("rank", "update_gap"):
        if int(group[key]) <= 0:
            raise ValueError(f"GaLoreAdamW: {key} must be a positive integer, got {group[key]}.")
    if not 0 <= group["betas"][0] < 1 or not 0 <= group["betas"][1] < 1:
        raise ValueError(f"GaLoreAdamW: betas must be in [0, 1), got {group['betas']}.")
