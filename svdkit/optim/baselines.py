"""The baselines, registered so that `svdkit pretrain --optimizer adamw|muon` and the benchmark name them like
the others: torch's own AdamW and Muon (not rewritten), Muon on the matrices with AdamW for the rest."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from svdkit.core.registry import config_to_dict, register


@register
@dataclass(frozen=True)
class AdamWBaseline:
    """Full-rank AdamW (torch.optim.AdamW, https://arxiv.org/abs/1711.05101) on every parameter."""

    kind: ClassVar[str] = "optim"
    name: ClassVar[str] = "adamw"
    paper: ClassVar[str] = "https://arxiv.org/abs/1711.05101"
    summary: ClassVar[str] = "full-rank AdamW (torch.optim.AdamW): the reference"
    default_lr: ClassVar[float] = 1e-3
    parametrizes: ClassVar[bool] = False

    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    seed: int = 0

    def to_dict(self) -> dict:
        return config_to_dict(self)

    def make(self, groups: list, lr: float):
        params = [p for g in groups for p in g["params"]]
        return torch.optim.AdamW(params, lr=lr, betas=tuple(self.betas), eps=self.eps, weight_decay=self.weight_decay)


@register
@dataclass(frozen=True)
class MuonBaseline:
    """Muon (torch.optim.Muon, https://kellerjordan.github.io/posts/muon/): momentum orthogonalized by 5
    Newton–Schulz steps on the low-rank-eligible matrices (the same ones GaLore projects), AdamW on the rest.
    ``adjust_lr_fn="match_rms_adamw"`` scales Muon's update to AdamW's RMS so one learning rate serves both."""

    kind: ClassVar[str] = "optim"
    name: ClassVar[str] = "muon"
    paper: ClassVar[str] = "https://kellerjordan.github.io/posts/muon/"
    summary: ClassVar[str] = "torch.optim.Muon on the matrices (RMS matched to AdamW), AdamW on the rest"
    default_lr: ClassVar[float] = 1e-3
    parametrizes: ClassVar[bool] = False

    momentum: float = 0.95
    weight_decay: float = 0.0
    seed: int = 0

    def to_dict(self) -> dict:
        return config_to_dict(self)

    def make(self, groups: list, lr: float):
        matrices = [p for g in groups if g.get("low_rank", True) is not False for p in g["params"] if p.ndim == 2]
        chosen = {id(p) for p in matrices}
        rest = [p for g in groups for p in g["params"] if id(p) not in chosen]
        opts = [torch.optim.Muon(matrices, lr=lr, momentum=self.momentum, weight_decay=self.weight_decay,
                                 adjust_lr_fn="match_rms_adamw")]  # fmt: skip
        if rest:
            opts.append(torch.optim.AdamW(rest, lr=lr, weight_decay=self.weight_decay))
        return Chained(opts)


class Chained(torch.optim.Optimizer):
    """Several optimizers stepped as one: ``param_groups`` are theirs (a scheduler changing a group's lr
    changes it in the optimizer that owns it); ``state_dict`` is ``{"optimizers": [each one's]}``."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = list(optimizers)
        super().__init__([p for o in self.optimizers for g in o.param_groups for p in g["params"]], {})
        self.param_groups = [g for o in self.optimizers for g in o.param_groups]

    @property
    def state(self) -> dict:  # type: ignore[override]
        """The inner optimizers' per-parameter states, merged (a read-only view: they own them)."""
        return {p: s for o in self.optimizers for p, s in o.state.items()}

    @state.setter
    def state(self, value) -> None:  # torch.optim.Optimizer.__init__ assigns an empty one: the inner ones own it
        pass

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for o in self.optimizers:
            o.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state_dict: dict) -> None:
        for o, s in zip(self.optimizers, state_dict["optimizers"], strict=True):
            o.load_state_dict(s)
