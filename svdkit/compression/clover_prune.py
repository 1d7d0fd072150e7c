"""``clover-prune``: CLOVER's training-free pruning of per-head V·O singular directions (Meng et al., ICML 2025,
https://arxiv.org/abs/2411.17426)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from svdkit.compression.config import CompressConfig
from svdkit.compression.engine import ModuleRow, replace_module
from svdkit.compression.layers import PrunedOutput, PrunedValue
from svdkit.core.linalg_lowrank import factored_svd
from svdkit.core.registry import register

ALLOCATIONS = ("uniform", "global")


@register
@dataclass(frozen=True)
class CLOVERPrune(CompressConfig):
    """CLOVER pruning of the value/output pair of every attention block, per KV head g:

        M_g = [W_o[:, h] for h ∈ G(g)] (rows stacked, |G|·m × d) · W_v[g] (d × n) = U_g S_g V_gᵀ,
        W_v'[g] = S_{g,k} V_{g,k}ᵀ (k_g × n),   W_o'[:, h] = the h-th m-row block of U_{g,k} (m × k_g),

    with G(g) the query heads that read value head g (GQA; Hugging Face's repeat_kv: h ∈ [g·|G|, (g+1)·|G|)).
    Why it is exact: attention mixes positions, never value channels — head h's output is A_h X W_v[g]ᵀ with
    A_h (tokens × tokens) from Q·K alone — so the block's V·O output is Σ_h A_h X W_v[g]ᵀ W_o[:, h]ᵀ and only
    the products W_o[:, h] W_v[g] (the m-row blocks of M_g) matter. With every direction kept the pruned pair
    computes the same function; keeping k_g, head h's product changes by the h-th block of M_g − M_{g,k}, so
    Σ_{h∈G(g)} ‖W_o[:, h] W_v[g] − W_o'[:, h] W_v'[g]‖_F² = ‖M_g − M_{g,k}‖_F² = Σ_{i>k_g} σ_{g,i}², and by
    Eckart–Young on the stack this is the least error of any pruning in which the heads of G(g) share the
    pruned value head (they must: one value head is cached and read by all of them). The SVD is taken from
    thin QRs of the two factors (:func:`svdkit.core.linalg_lowrank.factored_svd`, float64), never the
    |G|·m × n product; a d × d core per KV head.

    Storage: v_proj becomes :class:`PrunedValue` (nn.Linear(n → Σ_g k_g) whose outputs are scattered into
    zeros of width H_kv·d) and o_proj :class:`PrunedOutput` (gather of the kept columns, then
    nn.Linear(Σ_h k_{g(h)} → m) with o_proj's bias), so the Hugging Face attention still sees head_dim d:
    parameters shrink; the attention compute and the KV cache do not (a custom attention would be needed).
    The dense export writes the kept rows/columns in place and zeros elsewhere (a plain model, same logits).

    ratio: the fraction of the v_proj + o_proj parameters removed. A direction of KV head g costs
    c = n + |G|·m parameters, so the removed fraction is 1 − Σ k_g / (H_kv·d) per block.
    allocation="uniform" (default): k = round((1 − ratio)·d) for every KV head — the paper's "prune x % of the
    head dimension". allocation="global": one threshold on σ²/c over every KV head of every block — the
    directions are taken in decreasing σ²/c (with equal costs: decreasing σ) while the kept parameters stay
    nearest the budget (1 − ratio)·Σ params; this minimizes the summed product error Σ_g Σ_{i>k_g} σ_{g,i}²
    for the budget, but σ is data-free and its scale differs by orders of magnitude between blocks (the
    inputs' RMSNorm gains and activations are not in W_v), so it prunes the wrong blocks: on the default
    model (benchmarks/compress.py's 16 × 128 held-out tokens, one run each) global 28 190 vs uniform 3 844 perplexity at 20 % removed,
    51 151 vs 13 437 at 40 % (a per-block-normalized threshold: 4 641 and 37 419) — hence the default.
    Both keep at least one direction per KV head and round to the nearest whole direction, so a ratio below
    half a direction keeps everything (the pair is then only rotated: same logits).

    Q·K side (left out): CLOVER also prunes per head W_q[h]ᵀ W_k[h] = U S Vᵀ (√S to each side). That is
    exact only if nothing acts between the projection and the dot product: rotary embeddings (Llama,
    Mistral, Qwen, SmolLM2) rotate pairs of head dimensions by a position-dependent angle, which does not
    commute with a rotation of the head basis, and q/k biases (GPT-2, BERT, Qwen2) add terms the product
    omits. The supported families have one or the other, so only V·O is pruned (value vectors carry no
    rotary embedding). A value projection with a bias is refused (the bias reaches the output as the
    constant Σ_h W_o[:, h] b_g, which new o_proj columns would change), as is a value/output pair that is
    not a plain nn.Linear (GPT-2's fused c_attn, an already compressed module).

    targets/exclude select value projections (matched linears whose name ends in ``vo_pair[0]``); each one's
    sibling ``vo_pair[1]`` under the same parent is rewritten with it. Head layout (num_attention_heads,
    num_key_value_heads, head_dim) comes from the model's config. Data-free; ``svd``/``niter``/``oversample``
    are not used (the cores are d × d and always exact).
    """

    allocation: str = "uniform"
    vo_pair: tuple[str, str] = ("v_proj", "o_proj")

    name = "clover-prune"
    paper = "https://arxiv.org/abs/2411.17426"
    summary = "CLOVER: prune the smallest per-KV-head singular directions of W_o·W_v (GQA-aware, data-free)"
    structured = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"clover-prune: allocation must be one of {ALLOCATIONS}, got {self.allocation!r}.")
        if isinstance(self.vo_pair, list):
            object.__setattr__(self, "vo_pair", tuple(self.vo_pair))
        pair = self.vo_pair
        if not (isinstance(pair, tuple) and len(pair) == 2 and all(isinstance(p, str) and p for p in pair) and pair[0] != pair[1]):
            raise ValueError(f"clover-prune: vo_pair must be two different module-name suffixes (value, output) such "
                             f"as ('v_proj', 'o_proj'), got {pair!r}.")  # fmt: skip

    def compress_model(self, model, targets, progress=None) -> list[ModuleRow]:
        from tqdm.auto import tqdm

        heads, kv, d = head_layout(model)
        pairs = self.pairs(model, targets, heads, kv, d)
        svds = [grouped_vo_svd(Wo.detach(), Wv.detach(), kv, d)
                for _, Wv, _, Wo in tqdm(pairs, desc="svdkit clover-prune", unit="block", disable=progress is False)]  # fmt: skip
        costs = [Wv.shape[1] + (heads // kv) * Wo.shape[0] for _, Wv, _, Wo in pairs]
        ranks = allocate([S for _, S, _ in svds], costs, d, self.ratio, self.allocation)
        rows = []
        for (v_name, Wv, o_name, Wo), (U, S, Vh), k in zip(pairs, svds, ranks):
            rows += prune_pair(model, v_name, Wv, o_name, Wo, U, S, Vh, k, heads // kv)
        return rows

    def pairs(self, model, targets, heads: int, kv: int, d: int) -> list[tuple[str, Tensor, str, Tensor]]:
        """(value name, W_v, output name, W_o) per attention block, checked before anything changes."""
        value, output = self.vo_pair
        names = [n for n, _ in targets if n == value or n.endswith("." + value)]
        if not names:
            raise ValueError(f"clover-prune: none of the targeted linears is a value projection (a name ending in "
                             f"{value!r}); target the attention blocks (targets='all-linear') or set vo_pair to the "
                             "model's (value, output) module names.")  # fmt: skip
        out = []
        for v_name in names:
            o_name = v_name[: len(v_name) - len(value)] + output
            v_mod = model.get_submodule(v_name)
            try:
                o_mod = model.get_submodule(o_name)
            except AttributeError:
                raise ValueError(f"clover-prune: {v_name} has no sibling output projection {o_name}; CLOVER prunes a "
                                 "value projection together with its output projection (set vo_pair).") from None  # fmt: skip
            for name, mod in ((v_name, v_mod), (o_name, o_mod)):
                if type(mod) is not nn.Linear:
                    raise ValueError(f"clover-prune: {name} is a {type(mod).__name__}, not a plain nn.Linear (a fused "
                                     "qkv projection or an already compressed module); prune the original model.")  # fmt: skip
            if v_mod.bias is not None:
                raise ValueError(f"clover-prune: {v_name} has a bias; it reaches the output through attention as the "
                                 f"constant Σ_h W_o[:, h]·b, which pruned {o_name} columns would change. Biased value "
                                 "projections are not supported.")  # fmt: skip
            Wv, Wo = v_mod.weight, o_mod.weight
            if Wv.shape[0] != kv * d or Wo.shape[1] != heads * d:
                raise ValueError(f"clover-prune: {v_name} ({Wv.shape[0]}×{Wv.shape[1]}) and {o_name} "
                                 f"({Wo.shape[0]}×{Wo.shape[1]}) do not match the config's attention layout: "
                                 f"{kv} KV heads and {heads} heads of size {d} (v out = {kv * d}, o in = {heads * d}).")  # fmt: skip
            out.append((v_name, Wv, o_name, Wo))
        return out


def head_layout(model) -> tuple[int, int, int]:
    """(query heads H, KV heads H_kv, head size d) from the model's (text) config."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    heads = getattr(config, "num_attention_heads", None)
    kv = getattr(config, "num_key_value_heads", None) or heads
    d = getattr(config, "head_dim", None)
    hidden = getattr(config, "hidden_size", None)
    if not isinstance(d, int) and isinstance(heads, int) and isinstance(hidden, int) and heads > 0:
        d = hidden // heads
    if not all(isinstance(x, int) and x > 0 for x in (heads, kv, d)) or heads % kv:
        raise ValueError(f"clover-prune needs the attention's head layout from the model's config (num_attention_heads, "
                         f"num_key_value_heads dividing it, head_dim or hidden_size); {type(model).__name__} gives "
                         f"heads={heads}, kv heads={kv}, head size={d}.")  # fmt: skip
    return heads, kv, d


def grouped_vo_svd(Wo: Tensor, Wv: Tensor, kv: int, d: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per KV head g the SVD of M_g = [W_o[:, h] for h ∈ G(g)] (stacked rows) · W_v[g], in float64.

    W_o (m × H·d), W_v (H_kv·d × n) → U (H_kv, |G|·m, d) with rows ordered (query head within the group,
    output row), S (H_kv, d) descending, Vh (H_kv, d, n); via :func:`factored_svd` (QRs of both factors).
    """
    m, group = Wo.shape[0], Wo.shape[1] // (kv * d)
    stacked = Wo.double().reshape(m, kv, group, d).permute(1, 2, 0, 3).reshape(kv, group * m, d)
    return factored_svd(stacked, Wv.double().reshape(kv, d, Wv.shape[1]))


def allocate(spectra: list[Tensor], costs: list[int], d: int, ratio: float, allocation: str) -> list[Tensor]:
    """Directions kept per KV head (one (H_kv,) tensor per block), see :class:`CLOVERPrune`."""
    if allocation == "uniform":
        k = min(max(round((1.0 - ratio) * d), 1), d)
        return [torch.full((S.shape[0],), k, dtype=torch.long) for S in spectra]
    budget = (1.0 - ratio) * sum(S.shape[0] * d * c for S, c in zip(spectra, costs))
    floor = sum(S.shape[0] * c for S, c in zip(spectra, costs))  # one direction per KV head
    if floor > budget + 0.5 * min(costs):
        raise ValueError(f"clover-prune: ratio {ratio} leaves less than one direction per KV head; use ratio ≤ "
                         f"{1 - 1 / d:.4g}.")  # fmt: skip
    score = torch.cat([(S[:, 1:].square() / c).reshape(-1) for S, c in zip(spectra, costs)])
    cost = torch.cat([torch.full((S[:, 1:].numel(),), float(c), dtype=torch.float64) for S, c in zip(spectra, costs)])
    order = torch.sort(score, descending=True, stable=True).indices  # ties keep (block, head, i) order: prefixes
    taken_cost = floor + cost[order].cumsum(0)
    take = torch.zeros_like(score, dtype=torch.bool)
    take[order[(taken_cost - cost[order] / 2) <= budget]] = True  # nearest the budget, whole directions
    ranks, at = [], 0
    for S in spectra:
        n = S[:, 1:].numel()
        ranks.append(1 + take[at: at + n].reshape(S.shape[0], -1).sum(1))
        at += n
    return ranks


def prune_pair(model, v_name: str, Wv: Tensor, o_name: str, Wo: Tensor, U: Tensor, S: Tensor, Vh: Tensor,
               k: Tensor, group: int) -> list[ModuleRow]:  # fmt: skip
    """Replace one block's v_proj/o_proj by the kept directions ``k`` (per KV head) and return their rows."""
    kv, d = S.shape
    m, n = Wo.shape[0], Wv.shape[1]
    ks = [int(x) for x in k]
    v_rows = torch.cat([S[g, : ks[g], None] * Vh[g, : ks[g]] for g in range(kv)])
    v_index = torch.cat([g * d + torch.arange(ks[g]) for g in range(kv)])
    o_cols = torch.cat([U[h // group, (h % group) * m: (h % group + 1) * m, : ks[h // group]] for h in range(kv * group)], 1)
    o_index = torch.cat([h * d + torch.arange(ks[h // group]) for h in range(kv * group)])
    o_mod = model.get_submodule(o_name)
    value = PrunedValue(n, kv * d, v_index, dtype=Wv.dtype, device=Wv.device)
    out = PrunedOutput(kv * group * d, m, o_index, o_mod.bias is not None, dtype=Wo.dtype, device=Wo.device)
    with torch.no_grad():
        value.proj.weight.copy_(v_rows)
        out.proj.weight.copy_(o_cols)
        if o_mod.bias is not None:
            out.proj.bias.copy_(o_mod.bias)
    value.train(model.get_submodule(v_name).training)
    out.train(o_mod.training)
    replace_module(model, v_name, value)
    replace_module(model, o_name, out)
    sq = S.square()
    kept = float(sum(sq[g, : ks[g]].sum() for g in range(kv)) / sq.sum().clamp(min=1e-300))
    extra = {"kept_per_kv_head": ks, "discarded_sq": [float(sq[g, ks[g]:].sum()) for g in range(kv)]}
    return [ModuleRow(v_name, (kv * d, n), len(v_index), kv * d * n, len(v_index) * n, kept, None, extra=extra),
            ModuleRow(o_name, (m, kv * group * d), len(o_index), m * kv * group * d, m * len(o_index), kept, None, extra=extra)]  # fmt: skip
