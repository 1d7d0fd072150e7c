"""CLOVER: per-head orthonormalized projections with a trainable d×d core per head.

Meng et al. 2024, https://arxiv.org/abs/2411.17426 (fxmeng/CLOVER), METHODS.md §15. A projection whose
m outputs split into h heads of d rows, W = [W_1; …; W_h] (each W_j: d × n), is factored per head by QR:

    W_jᵀ = Q_j R_j  (Q_j: n × d orthonormal columns, R_j: d × d upper triangular),  so  W_j = R_jᵀ Q_jᵀ.

The rows Q_jᵀ become the frozen input basis A = [Q_1ᵀ; …; Q_hᵀ] (m × n) and the R_j train:

    W' = W + s·C A,   C = blockdiag((T_1 − T_1⁰)ᵀ, …, (T_h − T_h⁰)ᵀ),  T_j⁰ = R_j / s,

so the adapted head is W'_j = (s·T_j)ᵀ Q_jᵀ — exactly W at init and a full-rank (per head) update after.

In a multi-head (MHA) block the value and output projections are decomposed together, per head h:

    M_h = W_o[:, h] W_v[h] = U_h S_h V_hᵀ  (n_o × n_v, rank ≤ d),
    v_proj rows of head h → (s·T_h)ᵀ V_hᵀ,  T_h⁰ = S_h / s (trainable, dense),  o_proj columns of head h → U_h,

which is exactly the original function at init (attention mixes positions, not value channels, so
Σ_h W_o[:, h] attn(W_v[h] x) = Σ_h U_h attn(S_h V_hᵀ x)), though neither layer alone keeps its weight.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from svdkit.adapters.config import AdapterConfig
from svdkit.core.registry import register
from svdkit.adapters.cores import Blocks, Core, hold_value
from svdkit.adapters.layers import Init, weight_matrix
from svdkit.core.linalg_structured import block_diagonal, head_product_svd, head_qr


class HeadCores(Core):
    """C = blockdiag((value_j − initial_j)ᵀ): one trainable d×d core per head, measured from its init.

    ``value`` (h, d, d) holds the per-head R_j/s and trains; ``initial`` is its frozen starting copy.
    Without ``initial`` (the V·O path, whose v_proj layer computes from its factors alone) C =
    blockdiag(value_jᵀ).
    """

    def __init__(self, value: Tensor, initial: Tensor | None = None):
        super().__init__()
        hold_value(self, value, initial)

    def forward(self) -> Tensor:
        return block_diagonal(self.structured().blocks)

    def structured(self) -> Blocks:
        """The per-head stack, applied by a batched matmul (never the dense m×m block-diagonal matrix)."""
        return Blocks((self.value if self.initial is None else self.value - self.initial).mT)

    def extra_repr(self) -> str:
        h, d, _ = self.value.shape
        return f"{h} heads of {d}×{d}"


@register
@dataclass(frozen=True)
class CLOVER(AdapterConfig):
    """CLOVER (https://arxiv.org/abs/2411.17426): train a d×d core per head of an orthonormalized projection.

    W_jᵀ = Q_j R_j per head (QR);  W' = W + s·blockdiag((T_j − R_j/s)ᵀ)·[Q_1ᵀ; …; Q_hᵀ],  T_j trainable;
    MHA value/output pair: W_o[:, h] W_v[h] = U_h S_h V_hᵀ;  W'_v[h] = (s·T_h)ᵀ V_hᵀ (T_h⁰ = S_h/s),
    W'_o[:, h] = U_h (frozen); trains h·d² = m·d per matrix (m·d/2 for MLP up-projections, 0 for o_proj).

    Defaults as the paper: targets q_proj, v_proj, up_proj (regexes), lr 1e-4. ``head_dim`` (None) is read
    from the model's config at adapt (``head_dim``, else hidden_size / num_attention_heads; SmolLM2: 64);
    an explicit value that disagrees with the config is an error, and a model without a config needs it. Modules whose name matches ``up_pattern`` (MLP up
    projections: up_proj, fc1, c_fc, intermediate; searched in the qualified module name) are split into
    pseudo-heads of head_dim/2 rows, as the paper's up_proj; every other target (gate_proj included)
    into heads of head_dim rows; ``up_pattern=None`` uses head_dim everywhere. ``rank`` is not used.

    ``vo_pair`` (default ("v_proj", "o_proj")): name suffixes of the value and output projections under a
    common parent (``….self_attn.v_proj`` with ``….self_attn.o_proj``; BERT: ("self.value", "output.dense")).
    A targeted value projection whose partner exists (targeted or not, unless excluded) and takes as many
    inputs as the value gives (v out = o in: MHA) is decomposed with it by the V·O SVD; otherwise (GQA:
    fewer kv heads; no partner; ``vo_pair=None``) it takes the per-head QR like q_proj.

    Paper vs this implementation:
      * q_proj, up_proj and GQA v_proj use the per-head QR; MHA v_proj/o_proj the joint SVD above. Both
        V·O layers compute from their factors alone (``Init.weightless``): v = s·blockdiag(T_hᵀ)·[V_hᵀ] x,
        o = s·B z + b_o with frozen B = [U_1 … U_h]/s. Their original weights stay, frozen and unused, so
        unadapt is bit-exact (the pair holds W_v, W_o and factors of the same sizes); ``fold`` changes
        nothing for CLOVER. T_h = S_hᵀ/s at init (diagonal, trained dense), so every CLOVER head reads
        W'_h = (s·T_h)ᵀ·basis_hᵀ. METHODS §15 writes the SVD of the transpose W_vᵀW_oᵀ (its U is our V).
        The SVD of the n×n product is taken through the thin QRs of its two factors (the same U, S, V;
        O(n·d²) per head). A value projection with a bias is refused:
        the bias passes through attention as the constant W_o[:, h] b_h, which o's new columns U_h would
        change (the paper's models have none; set vo_pair=None to use the QR path there).
      * The paper's dropout (0.05) acts on the projection output; the shared layer has input dropout
        only, so ``dropout`` (default 0) drops the adapter's input x in s·C·A·drop(x).
      * The core is applied per head as a (h, d, d) stack (``cores.Blocks``: one batched matmul, m·d per
        token); the dense m×m block-diagonal matrix is only built for the dense views (merge, ΔW).
    Each layer is initialized alone (``batched = False``): q/v heads and up-projection pseudo-heads of
    the same weight shape (gate_proj and up_proj) have cores of different shapes.
    """

    targets: str | tuple[str, ...] = ("q_proj", "v_proj", "up_proj")
    head_dim: int | None = None  # None: the model config's head size (see for_model)
    up_pattern: str | None = r"up_proj|fc1|c_fc|intermediate"
    vo_pair: tuple[str, str] | None = ("v_proj", "o_proj")

    name = "clover"
    lr = 1e-4
    basis = "per-head QR of W (orthonormal rows Q_hᵀ); MHA v/o: per-head SVD of W_o W_v"
    trains = "dense d×d core per head"
    params = "h·d² = m·d (m·d/2 for up-projections; 0 for the MHA o_proj)"
    export_rank = "full (merge)"
    paper = "https://arxiv.org/abs/2411.17426"
    exports_lora = False
    uses_rank = False
    batched = False

    def __post_init__(self) -> None:
        super().__post_init__()
        d = self.head_dim
        if d is not None and (isinstance(d, bool) or not isinstance(d, int) or d < 2 or d % 2):
            raise ValueError(f"CLOVER: head_dim must be an even integer >= 2 (up-projections use head_dim/2), "
                             f"got {self.head_dim!r}.")  # fmt: skip
        try:
            if self.up_pattern is not None:
                re.compile(self.up_pattern)
        except (re.error, TypeError) as exc:
            raise ValueError(f"CLOVER: up_pattern {self.up_pattern!r} is not a valid regular expression ({exc}).") from None
        if isinstance(self.vo_pair, list):
            object.__setattr__(self, "vo_pair", tuple(self.vo_pair))
        pair = self.vo_pair
        if pair is not None and not (isinstance(pair, tuple) and len(pair) == 2
                                     and all(isinstance(p, str) and p for p in pair) and pair[0] != pair[1]):  # fmt: skip
            raise ValueError(f"CLOVER: vo_pair must be None or two different module-name suffixes (value, output) "
                             f"such as ('v_proj', 'o_proj'), got {pair!r}.")  # fmt: skip

    def for_model(self, model_config) -> "CLOVER":
        """head_dim from the model's config: ``head_dim``, else hidden_size / num_attention_heads."""
        size = getattr(model_config, "head_dim", None)
        heads, hidden = getattr(model_config, "num_attention_heads", None), getattr(model_config, "hidden_size", None)
        if not isinstance(size, int) and isinstance(heads, int) and isinstance(hidden, int) and heads > 0:
            size = hidden // heads
        if not isinstance(size, int) or isinstance(size, bool):
            if self.head_dim is None:
                raise ValueError("CLOVER: the model has no config giving its head size (head_dim, or hidden_size and "
                                 "num_attention_heads); pass head_dim=<the attention head size>.")  # fmt: skip
            return self
        if self.head_dim is None:
            return dataclasses.replace(self, head_dim=size)
        if self.head_dim != size:
            raise ValueError(f"CLOVER: head_dim={self.head_dim} disagrees with the model's head size {size} (from its "
                             "config); leave head_dim unset to use the model's.")  # fmt: skip
        return self

    def _need_head_dim(self) -> None:
        if self.head_dim is None:
            raise ValueError("CLOVER: head_dim is not set: svdkit.adapt reads it from the model's config "
                             "(cfg.for_model(model.config)); outside adapt pass head_dim explicitly.")  # fmt: skip

    def block_size(self, name: str) -> int:
        """Rows per head of module ``name``: head_dim/2 for MLP up-projections (``up_pattern``), else head_dim."""
        self._need_head_dim()
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

    def groups(self, targets, linears) -> list[tuple[str, str]]:
        """(value, output) name pairs of MHA blocks: a targeted value projection and its sibling output
        projection under the same parent, when v's out size equals o's in size (as many kv heads as heads)."""
        if self.vo_pair is None:
            return []
        value, output = self.vo_pair
        pairs = []
        for name in targets:
            if name != value and not name.endswith("." + value):
                continue
            partner = name[: len(name) - len(value)] + output
            if partner not in linears or weight_matrix(linears[name]).shape[0] != weight_matrix(linears[partner]).shape[1]:
                continue
            if linears[name].bias is not None:
                raise ValueError(
                    f"CLOVER: {name} has a bias; the V·O path (MHA) replaces {partner}'s columns, which would change "
                    f"the bias's contribution W_o b through attention. Set vo_pair=None to use the per-head QR on it."
                )
            pairs.append((name, partner))
        return pairs

    def initialize_group(self, weights, names, calibration=None) -> list[Init]:
        """The V·O path: v_proj A = [V_1ᵀ; …], core T_h = S_h/s; o_proj B = [U_1 … U_h]/s; both weightless."""
        (Wv, Wo), (v_name, o_name) = weights, names
        self._need_head_dim()
        (m, n), d = Wv.shape, self.head_dim
        self._check(v_name, m, n, d)
        if Wo.shape[0] < d:
            raise ValueError(f"CLOVER: {o_name} has a {Wo.shape[0]}×{Wo.shape[1]} weight; the V·O SVD needs "
                             f"out_features >= the head size {d}. Set vo_pair=None.")  # fmt: skip
        U, S, Vh = head_product_svd(Wo.to(self.dtype), Wv.to(self.dtype), d)
        T = torch.diag_embed(S) / self.for_module(v_name).scaling
        B = U.transpose(0, 1).reshape(Wo.shape[0], m) / self.for_module(o_name).scaling
        v = Init(A=Vh.reshape(1, m, n), B=None, trainable=frozenset(), subtract=False, core={"value": T[None]},
                 weightless=True)  # fmt: skip
        o = Init(A=None, B=B[None], trainable=frozenset(), subtract=False, weightless=True)
        return [v, o]

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
