"""CLOVER: per-head orthonormalized projections with a trainable d×d core per head.

Meng et al. 2024, https://arxiv.org/abs/2411.17426 (fxmeng/CLOVER), METHODS.md §15. A projection whose
m outputs split into h heads of d rows, W = [W_1; …; W_h] (each W_j: d × n), is factored per head by QR:

    W_jᵀ = Q_j R_j  (Q_j: n × d orthonormal columns, R_j: d × d upper triangular),  so  W_j = R_jᵀ Q_jᵀ.

The rows Q_jᵀ become the frozen input basis A = [Q_1ᵀ; …; Q_hᵀ] (m × n) and the R_j train:

    W' = W + s·C A,   C = blockdiag((T_1 − T_1⁰)ᵀ, …, (T_h − T_h⁰)ᵀ),  T_j⁰ = R_j / s,

so the adapted head is W'_j = (s·T_j)ᵀ Q_jᵀ — exactly W at init and a full-rank (per head) update after.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import AdapterConfig, register
from ..cores import Core
from ..layers import Init


def head_qr(weights: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """Per-head QR of W_jᵀ for (b, m, n) weights split into heads of ``block`` rows.

    Returns Q (b, h, n, d) with orthonormal columns and R (b, h, d, d) upper triangular with a
    non-negative diagonal (the unique sign convention), so that W_j = R_jᵀ Q_jᵀ.
    """
    b, m, n = weights.shape
    heads = weights.reshape(b, m // block, block, n)  # W_j: (d × n)
    Q, R = torch.linalg.qr(heads.mT)  # W_jᵀ (n × d) = Q_j R_j
    signs = torch.sign(torch.diagonal(R, dim1=-2, dim2=-1))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return Q * signs.unsqueeze(-2), R * signs.unsqueeze(-1)


def block_diagonal(blocks: Tensor) -> Tensor:
    """blockdiag(B_1, …, B_h) of an (h, d, d) stack, as a dense (h·d × h·d) matrix."""
    return torch.block_diag(*blocks.unbind(0))


class HeadCores(Core):
    """C = blockdiag((value_j − initial_j)ᵀ): one trainable d×d core per head, measured from its init.

    ``value`` (h, d, d) holds the per-head R_j/s and trains; ``initial`` is its frozen starting copy.
    """

    def __init__(self, value: Tensor, initial: Tensor):
        super().__init__()
        self.value = nn.Parameter(value.detach().clone())
        self.register_buffer("initial", initial.detach().clone())

    def forward(self) -> Tensor:
        return block_diagonal((self.value - self.initial).mT)

    def extra_repr(self) -> str:
        h, d, _ = self.value.shape
        return f"{h} heads of {d}×{d}"


@register
@dataclass(frozen=True)
class CLOVER(AdapterConfig):
    """CLOVER (https://arxiv.org/abs/2411.17426): train a d×d core per head of an orthonormalized projection.

    W_jᵀ = Q_j R_j per head (QR);  W' = W + s·blockdiag((T_j − R_j/s)ᵀ)·[Q_1ᵀ; …; Q_hᵀ],  T_j trainable;
    trains h·d² = m·d per matrix (m·d/2 for MLP up-projections).

    Defaults as the paper: targets q_proj, v_proj, up_proj (regexes), ``head_dim`` 64 (SmolLM2's
    head size; set it to your model's), lr 1e-4. Modules whose name matches ``up_pattern`` (MLP up
    projections: up_proj, fc1, c_fc, intermediate; searched in the qualified module name) are split into
    pseudo-heads of head_dim/2 rows, as the paper's up_proj; every other target (gate_proj included)
    into heads of head_dim rows; ``up_pattern=None`` uses head_dim everywhere. ``rank`` is not used.

    Paper vs this implementation:
      * q_proj, v_proj (any number of kv heads: the paper's GQA path) and up_proj use the per-head QR.
        The paper's MHA V–O path is not implemented (v_proj uses the QR path): per head it takes the SVD
        W_o^h W_v^h = U_h S_h V_hᵀ (n×n, rank ≤ d), sets v's rows to V_hᵀ, o's columns to U_h and trains
        S_h. That changes two modules from their joint weights, and ``initialize`` sees one module.
        Missing core support: a paired initialize that receives each block's v_proj and o_proj weights
        together (paired by module name) and returns one Init per module. The layer could then express
        it: v_proj as A = [V_hᵀ], core blockdiag(S_h) trainable, explicit B₀A₀ = W_v/s·I (S_h can sit on
        v's output: attention mixes positions, not value channels); o_proj as frozen B = [U_1 … U_h],
        A = None, explicit B₀A₀ = W_o/s·I — at the cost of dense frozen copies of W_v and W_o.
      * The paper's dropout (0.05) acts on the projection output; the shared layer has input dropout
        only, so ``dropout`` (default 0) drops the adapter's input x in s·C·A·drop(x).
      * The core is materialized as a dense m×m block-diagonal matrix (the shared layer takes a dense
        core); the product costs m² per token instead of m·d.
    Each layer is initialized alone (``batched = False``): q/v heads and up-projection pseudo-heads of
    the same weight shape (gate_proj and up_proj) have cores of different shapes.
    """

    targets: str | tuple[str, ...] = ("q_proj", "v_proj", "up_proj")
    head_dim: int = 64
    up_pattern: str | None = r"up_proj|fc1|c_fc|intermediate"

    name = "clover"
    lr = 1e-4
    basis = "per-head QR of W (orthonormal rows Q_hᵀ)"
    trains = "dense d×d core per head"
    params = "h·d² = m·d (m·d/2 for up-projections)"
    export_rank = "full (merge)"
    paper = "https://arxiv.org/abs/2411.17426"
    exports_lora = False
    uses_rank = False
    batched = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.head_dim, bool) or not isinstance(self.head_dim, int) or self.head_dim < 2 or self.head_dim % 2:
            raise ValueError(f"CLOVER: head_dim must be an even integer >= 2 (up-projections use head_dim/2), "
                             f"got {self.head_dim!r}.")  # fmt: skip
        try:
            if self.up_pattern is not None:
                re.compile(self.up_pattern)
        except (re.error, TypeError) as exc:
            raise ValueError(f"CLOVER: up_pattern {self.up_pattern!r} is not a valid regular expression ({exc}).") from None

    def block_size(self, name: str) -> int:
        """Rows per head of module ``name``: head_dim/2 for MLP up-projections (``up_pattern``), else head_dim."""
        up = self.up_pattern is not None and re.search(self.up_pattern, name) is not None
        return self.head_dim // 2 if up else self.head_dim

    def _check(self, name: str, m: int, n: int, block: int) -> None:
        kind = "pseudo-heads (head_dim/2, an MLP up-projection)" if block != self.head_dim else "heads"
        if m % block:
            raise ValueError(
                f"CLOVER: {name} has a {m}×{n} weight (out × in); its {m} outputs do not split into {kind} of "
                f"{block} rows (head_dim={self.head_dim}). Set head_dim to the model's head size or exclude the module."
            )
        if n < block:
            raise ValueError(f"CLOVER: {name} has a {m}×{n} weight; the per-head QR needs in_features >= the head "
                             f"size {block}. Exclude the module.")  # fmt: skip

    def initialize(self, weights, names, calibration=None) -> Init:
        b, m, n = weights.shape
        blocks = {self.block_size(name) for name in names}
        if len(blocks) > 1:
            raise ValueError(f"CLOVER: one batch mixes head sizes {sorted(blocks)} ({list(names)}).")
        block = blocks.pop()
        for name in names:
            self._check(name, m, n, block)
        Q, R = head_qr(weights.to(self.dtype), block)
        A = Q.mT.reshape(b, m, n)  # rows: Q_1ᵀ, …, Q_hᵀ
        R = R / self.scaling
        return Init(A=A, B=None, trainable=frozenset(), subtract=False, core={"value": R, "initial": R})

    core_type = HeadCores
