"""Three-matrix LoRA: ΔW = s·B N A with a trainable r×r core N (Guo, Wu, Chang 2025, arXiv 2502.14482).

SLoRA puts a kaiming-uniform N between kaiming A and zero B (function-preserving); NLoRA initializes the
three factors as the Nyström sketch of W from its first r rows and columns and does *not* take it out of
the base, so the model changes at init by design; IntTune is NLoRA with only N trained. N is the layer's
matrix core (``cores.Delta``), so export is a rank-r LoRA with B' = B N.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from svdkit.adapters.config import AdapterConfig
from svdkit.core.registry import register
from svdkit.adapters.cores import Delta
from svdkit.adapters.layers import Init
from svdkit.core.linalg import layer_seed

PAPER = "https://arxiv.org/abs/2502.14482"
NYSTROM_CORES = ("pinv", "slice")


def kaiming_uniform(shape: tuple[int, ...], fan_in: int, generator: torch.Generator, dtype: torch.dtype) -> Tensor:
    """U(−1/√fan_in, 1/√fan_in): ``nn.init.kaiming_uniform_(a=√5)``, nn.Linear's and PEFT's default."""
    bound = 1.0 / math.sqrt(fan_in)
    return torch.rand(shape, generator=generator, dtype=dtype) * (2 * bound) - bound


def layer_generator(cfg: AdapterConfig, name: str) -> torch.Generator:
    """A CPU generator seeded by (cfg.seed, module name): the same draws on every machine."""
    return torch.Generator().manual_seed(layer_seed(cfg.seed, name))


def contiguous_copy(t: Tensor, dtype: torch.dtype) -> Tensor:
    """A contiguous copy of a slice of the (possibly transposed, Conv1D) weight: never a view of it, and laid
    out as save/load will lay it out, so a reloaded adapter computes bit-identical outputs."""
    return t.to(dtype).clone(memory_format=torch.contiguous_format)


def nystrom_pinv(corner: Tensor) -> Tensor:
    """W[:r, :r]⁺ of the (b, r, r) corners, taken in float64 on the CPU (tiny; the corner can be
    ill-conditioned, and this makes N the same on every device), returned in the corners' dtype."""
    return torch.linalg.pinv(corner.detach().cpu().double()).to(device=corner.device, dtype=corner.dtype)


def nystrom_init(cfg: AdapterConfig, weights: Tensor, trainable: frozenset) -> Init:
    """A = W[:r, :], B = W[:, :r], N = W[:r, :r]⁺ ("pinv") or W[:r, :r] ("slice"); the base keeps all of W."""
    r = cfg.rank
    slices = (weights[:, :r, :], weights[:, :, :r], weights[:, :r, :r])
    A, B, corner = (contiguous_copy(t, cfg.dtype) for t in slices)
    N = corner if cfg.nystrom_core == "slice" else nystrom_pinv(corner)
    return Init(A=A, B=B, trainable=trainable, subtract=False, core={"value": N})


def check_nystrom_core(cfg: AdapterConfig) -> None:
    if cfg.nystrom_core not in NYSTROM_CORES:
        raise ValueError(
            f"{type(cfg).__name__}: nystrom_core must be 'pinv' (the paper: N = W[:r, :r]⁺) or 'slice' "
            f"(the official code: N = W[:r, :r]), got {cfg.nystrom_core!r}."
        )


@register
@dataclass(frozen=True)
class SLoRA(AdapterConfig):
    """SLoRA (https://arxiv.org/abs/2502.14482): ΔW = s·B N A, A and N kaiming-uniform, B = 0 (ΔW = 0 at init).

    Per layer A (r × in) ~ U(±1/√in) and N (r × r) ~ U(±1/√r) from one generator seeded by (seed, name).
    Trains r(m+n) + r² per matrix; exports as a rank-r LoRA (B' = B N). Paper/official-script defaults:
    r = α = 128, dropout 0, lr 2e-4, weight decay 0, all 7 projections; here r = α = 16.
    """

    name = "slora"
    basis = "random (kaiming A and N, zero B)"
    trains = "B, N, A"
    params = "r(m+n) + r²"
    export_rank = "r"
    paper = PAPER

    def initialize(self, weights, names, calibration=None) -> Init:
        b, m, n = weights.shape
        r, A, N = self.rank, [], []
        for name in names:
            g = layer_generator(self, name)
            A.append(kaiming_uniform((r, n), n, g, self.dtype))
            N.append(kaiming_uniform((r, r), r, g, self.dtype))
        B = torch.zeros(b, m, r, dtype=self.dtype)
        device = weights.device
        return Init(A=torch.stack(A).to(device), B=B.to(device), subtract=False,
                    core={"value": torch.stack(N).to(device)})  # fmt: skip

    core_type = Delta  # the r×r trainable N (no frozen initial: the NLoRA update is non-zero at init)


@register
@dataclass(frozen=True)
class NLoRA(AdapterConfig):
    """NLoRA (https://arxiv.org/abs/2502.14482): ΔW = s·B N A from the Nyström sketch of W; NOT function-preserving.

    A = W[:r, :], B = W[:, :r], N = W[:r, :r]⁺ (``nystrom_core="pinv"``, the paper's Nyström formula, so that
    B N A is the Nyström approximation of W) — the base is not reduced, so at init W' = W + s·B N A.
    The official code (TracyGuo2001/NLoRA) leaves the pinv line commented out and uses N = W[:r, :r]
    (``nystrom_core="slice"``). Trains r(m+n) + r²; exports as a rank-r LoRA (B' = B N).
    Measured on the default model (r = 16, `svdkit finetune --method nlora --steps 3`): the pinv init adds
    the rank-r Nyström approximation of every weight to it, and the held-out loss goes 3.90 → 19.5; the
    released code's ``"slice"``, which produced the paper's numbers, changes the function only slightly.
    Paper/official-script defaults: r = α = 128, dropout 0, lr 2e-4, weight decay 0; here r = α = 16.
    """

    nystrom_core: str = "pinv"

    name = "nlora"
    basis = "Nyström sketch (first r rows/columns of W)"
    trains = "B, N, A"
    params = "r(m+n) + r²"
    export_rank = "r"
    paper = PAPER

    def __post_init__(self) -> None:
        super().__post_init__()
        check_nystrom_core(self)

    def initialize(self, weights, names, calibration=None) -> Init:
        return nystrom_init(self, weights, frozenset({"A", "B"}))

    core_type = Delta  # the r×r trainable N (no frozen initial: the NLoRA update is non-zero at init)


@register
@dataclass(frozen=True)
class IntTune(NLoRA):
    """IntTune (https://arxiv.org/abs/2502.14482): NLoRA with A = W[:r, :] and B = W[:, :r] frozen; only N trains.

    ΔW = s·B N A, N from ``nystrom_core`` as in :class:`NLoRA` (paper "pinv", official code "slice"); NOT
    function-preserving. Trains r² per matrix; exports as a rank-r LoRA (B' = B N).
    Paper/official-script defaults: r = α = 128, dropout 0, lr 2e-4, weight decay 0; here r = α = 16.
    """

    name = "inttune"
    trains = "N"
    params = "r²"

    def initialize(self, weights, names, calibration=None) -> Init:
        return nystrom_init(self, weights, frozenset())
