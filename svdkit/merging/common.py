"""What every merge method shares: the method protocol, input checks, and the rules for non-matrix tensors.

A merge method is a frozen config dataclass registered with ``kind = "merge"`` (one file per method). The
engine (:mod:`svdkit.merging.engine`) streams the models tensor by tensor and calls, per tensor name ``key``:

- ``cfg.merge(deltas, weights, key, state) -> Tensor``: the merged task delta Δ (already scaled by α) from
  the T task deltas Δ_t = W_t − W_0 (fp32, or fp64 when ``svd_dtype="float64"``, stored as the checkpoint
  stores them), or, for a base-free method (``base_free = True``: LoRE), the merged *weight* from the T
  weights;
- LoRA-native methods (``lora_native = True``: KnOTS, Core Space) also define ``merge_factors(factors, key)``
  on the tasks' low-rank factors ``[(B_t, A_t)]`` (Δ_t = B_t A_t, weights folded in) and return ``(B, A)``
  with B A = the merged Δ, without forming any m×n matrix;
- an optional ``prepare(stream)`` pass (TIES with ``topk_scope="model"``) returns the ``state`` handed to
  ``merge``.

ClassVars: ``name``, ``kind``, ``paper``, ``summary`` (as every family), ``min_models`` (fewer inputs is an
error), ``base_free`` and ``lora_native``. Matrix methods apply their SVD rule to 2-D tensors only; every
other tensor (biases, norms) takes the weighted mean of the task deltas (the TSV/Iso papers' rule), scaled
by α like the matrices: ``per_tensor`` is that rule's one home.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def check_alpha(cfg, field: str = "alpha") -> None:
    value = getattr(cfg, field)
    if not value > 0:
        raise ValueError(f"{cfg.name}: {field} must be > 0 (got {value}); it scales the merged task vector.")


def check_fraction(cfg, field: str, low_open: bool = True) -> None:
    value = getattr(cfg, field)
    if value is None:
        return
    if not (0 < value <= 1 if low_open else 0 <= value <= 1):
        raise ValueError(f"{cfg.name}: {field} must be in (0, 1] (got {value}).")


def check_choice(cfg, field: str, choices: tuple[str, ...]) -> None:
    value = getattr(cfg, field)
    if value not in choices:
        raise ValueError(f"{cfg.name}: {field} must be one of {choices} (got {value!r}).")


def compute_dtype(cfg) -> torch.dtype:
    return DTYPES[getattr(cfg, "svd_dtype", "float32")]


def is_matrix(x: Tensor) -> bool:
    """Tensors the SVD rules apply to: 2-D with both sides > 1."""
    return x.ndim == 2 and min(x.shape) > 1


def weighted(deltas: list[Tensor], weights: list[float]) -> list[Tensor]:
    return [d if w == 1 else d * w for d, w in zip(deltas, weights)]


def weighted_mean(deltas: list[Tensor], weights: list[float]) -> Tensor:
    """(1/T) Σ_t w_t Δ_t: the plain mean of the task deltas when every weight is 1."""
    return sum(weighted(deltas, weights)) / len(deltas)


def per_tensor(deltas: list[Tensor], weights: list[float], matrix_rule: Callable[[], Tensor], vector_scale: float) -> Tensor:
    """``matrix_rule()`` for a matrix (``is_matrix``); ``vector_scale`` · (weighted mean of the deltas) for any
    other tensor (biases, norms: the TSV/Iso papers' rule). The one home of the guard the SVD methods share;
    ``vector_scale`` is α for methods that scale the whole merged vector, 1 for CART (its α scales only the
    low-rank terms)."""
    if is_matrix(deltas[0]):
        return matrix_rule()
    mean = weighted_mean(deltas, weights)
    return mean if vector_scale == 1 else vector_scale * mean


def check_svd_dtype(cfg) -> None:
    check_choice(cfg, "svd_dtype", tuple(DTYPES))


def dense_factors(delta: Tensor, tol: float = 1e-7) -> tuple[Tensor, Tensor]:
    """(B, A) with B A = Δ exactly (up to rounding) for a dense task delta: B = U diag(σ), A = Vᵀ over the
    singular values above ``tol``·σ₁, so LoRA-native methods also take fully fine-tuned models."""
    from svdkit.core.linalg_merge import thin_svd

    U, S, Vh = thin_svd(delta)
    keep = int((S > tol * S[0]).sum()) if S.numel() and S[0] > 0 else 0
    return U[:, :keep] * S[:keep], Vh[:keep]


# -- the LoRA-native methods (KnOTS, Core Space): one config check, one dense fallback ----------------------
def check_lora_native(cfg, rules: tuple[str, ...]) -> None:
    """Fields of a LoRA-native merge: alpha > 0, an inner rule among ``rules``, a TIES density in (0, 1], the SVD dtype."""
    check_alpha(cfg)
    check_choice(cfg, "inner", rules)
    check_fraction(cfg, "density")
    check_svd_dtype(cfg)


def no_update(factors: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor] | None:
    """Empty (B, A) when no input's factors change this matrix (total rank 0), else None."""
    if sum(B.shape[1] for B, _ in factors) == 0:
        return factors[0][0][:, :0], factors[0][1][:0]
    return None


def merge_dense_via_factors(cfg, deltas: list[Tensor], weights: list[float], key: str = "") -> Tensor:
    """A LoRA-native method on dense deltas: non-matrices take alpha·(weighted mean); a matrix Δ_t is factored
    exactly (``dense_factors``) and merged by ``cfg.merge_factors``."""
    def matrix() -> Tensor:
        B, A = cfg.merge_factors([dense_factors(d * w) for d, w in zip(deltas, weights)], key)
        return B @ A

    return per_tensor(deltas, weights, matrix, cfg.alpha)
