"""`svdkit.spectrum(model, base=None)`: one plain record per linear layer (the output head included, flagged).

    rows = svdkit.spectrum(model)                  # σ_max, norms, stable/effective rank, energy ranks, α, MP
    rows = svdkit.spectrum(finetuned, base=base)   # + intruders, subspace overlap, spectrum change, ΔW

Every ``nn.Linear`` and GPT-2 ``Conv1D`` is a row (weights as out × in); an svdkit adapter layer or a PEFT
LoRA layer is one row for its effective weight W = W₀ + ΔW (the scaling s applied), and its update ΔW is
analysed from its factors (:func:`svdkit.core.linalg_lowrank.factored_svd`, O((m + n) r²)) rather than as a
dense m×n product. An adapted layer carries its own base W₀, so it is always compared with it; for plain
layers the comparison needs ``base`` (a model whose module names match, PEFT's ``base_model.model.``
prefix ignored). Matrices are processed one at a time (moved to ``device`` for the SVD), so the extra
memory is one matrix's worth. σ-only columns come from :func:`svdkit.inspection.esd.spectral_metrics`.

Comparison columns (Shuttleworth et al. 2024, https://arxiv.org/abs/2410.21228; k = 10, ε = 0.5 as the
paper's code): with W₀ = U₀Σ₀V₀ᵀ (all q = min(m, n) directions) and W = UΣVᵀ, ``intruder_cos`` is
max_i |⟨u_j, u⁰_i⟩| for j ≤ k, ``intruders`` counts those < ε, ``intruder_energy`` = Σ_{j∈I} σ_j² / Σ_{j≤k} σ_j²;
``subspace_overlap`` = ‖U₀ₖᵀUₖ‖²_F / k (Hu et al. 2021 §7, the mean cos² of the principal angles) and
``subspace_angle_max`` the largest principal angle in degrees; ``sigma_change`` = (σ_j − σ⁰_j)/σ⁰_j for j ≤ k
and ``top_sigma_change`` its first entry; ``delta_*`` describe ΔW = W − W₀ (σ₁, ‖ΔW‖_F/‖W₀‖_F, stable and
effective rank).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from svdkit.adapters.layers import SpectralLinear, weight_matrix
from svdkit.core.linalg import check_matrix
from svdkit.core.linalg_lowrank import factored_svd
from svdkit.core.linalg_rank import best_cosines, effective_rank, principal_cosines
from svdkit.core.linalg_spectrum import gram_eigenvalues
from svdkit.core.targets import is_conv1d
from svdkit.inspection.esd import spectral_metrics

PEFT_PREFIX = "base_model.model."


@dataclass
class Matrix:
    """One analysed weight: W (out × in, effective), its own base W₀ if adapted, ΔW = L @ R if factored."""

    name: str
    kind: str  # "linear" | "conv1d" | "svdkit-adapter" | "peft-lora"
    weight: Tensor
    base: Tensor | None = None
    factors: tuple[Tensor, Tensor] | None = None
    dense_delta: Tensor | None = None  # ΔW when it has no usable factors (weightless / identity-factor layers)
    rank: int | None = None  # adapter rank


def _is_peft_lora(module: nn.Module) -> bool:
    return isinstance(getattr(module, "lora_A", None), nn.ModuleDict) and hasattr(module, "base_layer")


def _svdkit_matrix(name: str, layer: SpectralLinear) -> Matrix:
    """ΔW = s·(B C A − B₀ A₀) = [s·BC, −s·B₀] @ [A; A₀] (the B₀A₀ part only where the layer subtracts it)."""
    with torch.no_grad():
        W, W0, Bc, A = layer.merged_weight(), layer.original_weight(), layer.output_factor(), layer.lora_A
        if layer.weightless or Bc is None or A is None:
            return Matrix(name, "svdkit-adapter", W, W0, dense_delta=layer.delta_weight(), rank=layer.rank)
        L, R = [layer.scaling * Bc], [A]
        if layer.init_A is not None:
            L.append(-layer.scaling * layer.init_B)
            R.append(layer.init_A)
        return Matrix(name, "svdkit-adapter", W, W0, (torch.cat(L, 1), torch.cat(R, 0)), rank=layer.rank)


def _peft_matrix(name: str, module: nn.Module) -> Matrix:
    """ΔW = Σ_a s_a B_a A_a over the active adapters a (PEFT stores B: out×r, A: r×in even for Conv1D)."""
    with torch.no_grad():
        W0 = weight_matrix(module.get_base_layer())
        active = [a for a in module.active_adapters if a in module.lora_A]
        if any(getattr(module, "use_dora", {}).get(a, False) for a in active):  # DoRA: the delta is not s·BA
            delta = sum(module.get_delta_weight(a) for a in active)
            delta = delta.T if is_conv1d(module.get_base_layer()) else delta
            return Matrix(name, "peft-lora", W0 + delta.to(W0.dtype), W0, dense_delta=delta)
        L = torch.cat([module.scaling[a] * module.lora_B[a].weight for a in active], 1)
        R = torch.cat([module.lora_A[a].weight for a in active], 0)
        W = W0 + (L.to(torch.float32) @ R.to(torch.float32)).to(W0.dtype)
        return Matrix(name, "peft-lora", W, W0, (L, R), rank=R.shape[0])


def _modules(model: nn.Module):
    """(name, module) of every analysed layer in module order (an adapter's inner modules are not rows)."""
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if _is_peft_lora(module):
            inside.append(name)
        if isinstance(module, SpectralLinear) or _is_peft_lora(module) or isinstance(module, nn.Linear) or is_conv1d(module):
            yield name, module


def matrices(model: nn.Module):
    """Yield a :class:`Matrix` per analysed layer, lazily (an adapter's merged weight exists one at a time)."""
    for name, module in _modules(model):
        if isinstance(module, SpectralLinear):
            yield _svdkit_matrix(name, module)
        elif _is_peft_lora(module):
            yield _peft_matrix(name, module)
        else:
            yield Matrix(name, "conv1d" if is_conv1d(module) else "linear", weight_matrix(module).detach())


def _head_ids(model: nn.Module) -> set[int]:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return {id(head.weight)} if head is not None and getattr(head, "weight", None) is not None else set()


def _position(name: str) -> tuple[int | None, str]:
    """(block index, module type) for the report's layer × module grid: the first all-digit component of
    the dotted name and the last component (``model.layers.3.self_attn.q_proj`` → (3, "q_proj"))."""
    short = name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name
    digits = [int(p) for p in short.split(".") if re.fullmatch(r"\d+", p)]
    return (digits[0] if digits else None), short.split(".")[-1]


def _base_weights(base: nn.Module | None) -> dict[str, Tensor]:
    if base is None:
        return {}
    return {m.name[len(PEFT_PREFIX):] if m.name.startswith(PEFT_PREFIX) else m.name: (m.base if m.base is not None else m.weight)
            for m in matrices(base)}  # fmt: skip


def delta_spectrum(mat: Matrix, base: Tensor, device) -> Tensor:
    """Singular values of ΔW: from the factors when there are (fewer factor columns than min(m, n)), else dense."""
    if mat.factors is not None and mat.factors[0].shape[1] < min(mat.weight.shape):
        L, R = mat.factors
        return factored_svd(L.to(device), R.to(device))[1]
    delta = mat.dense_delta if mat.dense_delta is not None else mat.weight.to(torch.float64) - base.to(torch.float64)
    return gram_eigenvalues(delta.to(device)).sqrt()


def compare(W0: Tensor, W: Tensor, k: int = 10, eps: float = 0.5) -> dict:
    """The comparison columns of a row (see the module docstring) for base W₀ and new W, both m × n."""
    if W0.shape != W.shape:
        raise ValueError(f"the base weight {tuple(W0.shape)} and the new weight {tuple(W.shape)} differ in shape.")
    A, B = W0.to(torch.float32), W.to(torch.float32)
    U0, S0, _ = torch.linalg.svd(A, full_matrices=False)
    U1, S1, _ = torch.linalg.svd(B, full_matrices=False)
    k = min(k, S1.numel())
    best = best_cosines(U1[:, :k], U0)
    intr = best < eps
    top = S1[:k].double().square()
    cos = principal_cosines(U0[:, :k], U1[:, :k]).double()
    change = ((S1[:k] - S0[:k]) / S0[:k].clamp_min(torch.finfo(torch.float32).tiny)).double()
    return {"intruders": int(intr.sum()), "intruder_energy": float(top[intr].sum() / top.sum()),
            "intruder_cos": [round(float(c), 4) for c in best], "subspace_overlap": float(cos.square().mean()),
            "subspace_angle_max": math.degrees(math.acos(float(cos.min()))), "top_sigma_change": float(change[0]),
            "sigma_change": [round(float(c), 5) for c in change]}  # fmt: skip


def _delta_columns(S: Tensor, base: Tensor) -> dict:
    S = S.double().clamp_min(0)
    energy = float(S.square().sum())
    base_fro = float(base.double().norm())
    if energy == 0:
        return {"delta_sigma_max": 0.0, "delta_rel_fro": 0.0, "delta_stable_rank": float("nan"), "delta_effective_rank": float("nan")}
    return {"delta_sigma_max": float(S[0]), "delta_rel_fro": math.sqrt(energy) / base_fro if base_fro else float("inf"),
            "delta_stable_rank": energy / float(S[0]) ** 2, "delta_effective_rank": effective_rank(S)}  # fmt: skip


def _fit_floor(dtype: torch.dtype, q: int) -> float:
    """Relative level below which eigenvalues are left out of the power-law fit: q·u (u the unit round-off
    of the eigenvalue dtype, the error of :func:`gram_eigenvalues`), at least the fit's own 1e-10."""
    return max(1e-10, q * torch.finfo(dtype).eps)


def analyse(mat: Matrix, base: Tensor | None, *, k: int, eps: float, device, head: bool, dtype=torch.float32) -> dict:
    """One row: identity, shape, the σ-only metrics, and (with a base) the comparison and ΔW columns."""
    if not torch.is_floating_point(mat.weight):
        check_matrix(mat.weight, mat.name)  # its dtype error; finiteness is checked on the Gram diagonal below
    m, n = mat.weight.shape
    layer, module = _position(mat.name)
    row = {"name": mat.name, "layer": layer, "module": module, "kind": mat.kind, "head": head, "m": m, "n": n,
           "adapter_rank": mat.rank}  # fmt: skip
    W = mat.weight.detach().to(device)
    try:
        lam = gram_eigenvalues(W, dtype)
    except ValueError as exc:
        raise ValueError(f"{mat.name}: {exc}") from None
    row.update(spectral_metrics(lam, m, n, floor=_fit_floor(dtype, min(m, n))))
    row["has_base"] = base is not None
    if base is not None:
        if tuple(base.shape) != (m, n):
            raise ValueError(f"{mat.name}: the base weight has shape {tuple(base.shape)}, the model's {(m, n)}; "
                             "pass the base model this one was fine-tuned from.")  # fmt: skip
        B = base.detach().to(device)
        row.update(compare(B, W, k=k, eps=eps))
        row.update(_delta_columns(delta_spectrum(mat, B, device), B))
    return row


def spectrum(model: nn.Module, base: nn.Module | None = None, *, k: int = 10, eps: float = 0.5, device=None,
             dtype: torch.dtype = torch.float32, progress: bool | None = None) -> list[dict]:  # fmt: skip
    """One record per linear layer of ``model`` (see the module docstring for the columns).

    ``base``: the model ``model`` was fine-tuned from (same module names); ``k``/``eps``: intruder
    parameters; ``device``: where the SVDs run (default: each weight's own device); ``dtype``: precision of
    the eigenvalues (:func:`svdkit.core.linalg_spectrum.gram_eigenvalues`; fp32 is ~2× faster and moves α
    by < 1e-3 on the default model, except where two x_min candidates' KS distances tie to ~1e-5 and the
    rounding picks the neighbour — one matrix of 211, α 10.49 vs 10.09, inside σ_α = 1.78; fp64 is exact
    to ~1e-16·λ₁ and agrees with WeightWatcher to ~1e-12); eigenvalues below q·u·λ_max (u the unit
    round-off of ``dtype``) are left out of the α fit; ``progress``: tqdm bar (None: on when stderr is a terminal).
    Inputs are never modified.
    """
    from tqdm.auto import tqdm

    if k < 1 or not 0 < eps <= 1:
        raise ValueError(f"k must be ≥ 1 and eps in (0, 1]; got k={k}, eps={eps}.")
    heads = _head_ids(model)
    bases = _base_weights(base)
    total = sum(1 for _ in _modules(model))
    if not total:
        raise ValueError(f"{type(model).__name__} has no nn.Linear or Conv1D layer to analyse.")
    rows = []
    bar = tqdm(matrices(model), total=total, desc="svdkit spectrum", unit="matrix", disable=None if progress is None else not progress)
    for mat in bar:
        short = mat.name[len(PEFT_PREFIX):] if mat.name.startswith(PEFT_PREFIX) else mat.name
        ref = mat.base if mat.base is not None else bases.get(short)
        dev = torch.device(device) if device is not None else mat.weight.device
        module = model.get_submodule(mat.name)
        head = any(id(p) in heads for p in (getattr(module, "weight", None), getattr(getattr(module, "base_layer", None), "weight", None)))
        rows.append(analyse(mat, ref, k=k, eps=eps, device=dev, head=head, dtype=dtype))
    if base is not None and not any(r["has_base"] for r in rows):
        raise ValueError("no module name of the model matches one of the base model; pass the model it was fine-tuned from.")
    return rows
