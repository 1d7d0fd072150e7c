"""Which modules to adapt: by module name and type, never by per-architecture tables.

Presets:
  ``all-linear``  every linear layer except the output head (as PEFT's "all-linear");
  ``attention``   linears inside a numbered block whose path has a component containing "attn"/"attention";
  ``mlp``         the other linears inside a numbered block (feed-forward: gate/up/down, c_fc, intermediate…).
Anything else is a regular expression searched in the module's qualified name.
"""

from __future__ import annotations

import re
import sys
from typing import Iterator, Sequence

from torch import nn

PRESETS = ("all-linear", "attention", "mlp")
_ATTN = re.compile(r"attn|attention", re.IGNORECASE)
_BLOCK_INDEX = re.compile(r"\.\d+\.")


def conv1d_types() -> tuple[type, ...]:
    """GPT-2's Conv1D (weight stored in × out), if transformers is loaded (a model using it must be)."""
    mod = sys.modules.get("transformers.pytorch_utils")
    return (mod.Conv1D,) if mod is not None and hasattr(mod, "Conv1D") else ()


def is_conv1d(module: nn.Module) -> bool:
    types = conv1d_types()
    return bool(types) and isinstance(module, types)


def linear_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) for every ``nn.Linear`` and GPT-2 ``Conv1D`` in the model."""
    kinds = (nn.Linear,) + conv1d_types()
    for name, module in model.named_modules():
        if isinstance(module, kinds):
            yield name, module


def _output_head(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    return head if isinstance(head, nn.Module) else None


def _in_preset(preset: str, name: str, module: nn.Module, head: nn.Module | None) -> bool:
    if preset == "all-linear":
        return module is not head and not (head is None and name.split(".")[-1] == "lm_head")
    match = _BLOCK_INDEX.search("." + name + ".")
    if match is None:  # not inside a numbered transformer block
        return False
    inner = name[match.end() - 1 :].split(".")[:-1]  # path components after the block index
    in_attention = any(_ATTN.search(part) for part in inner)
    return in_attention if preset == "attention" else not in_attention


def select_targets(
    model: nn.Module, targets: str | Sequence[str], exclude: str | None = None
) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs a config targets, in model order; a clear error if there are none."""
    patterns = (targets,) if isinstance(targets, str) else tuple(targets)
    head = _output_head(model)
    candidates = list(linear_modules(model))
    chosen = []
    for name, module in candidates:
        hit = any(
            _in_preset(p, name, module, head) if p in PRESETS else re.search(p, name) is not None
            for p in patterns
        )
        if hit and not (exclude and re.search(exclude, name)):
            chosen.append((name, module))
    if not chosen:
        raise ValueError(_nothing_matched(patterns, exclude, [n for n, _ in candidates]))
    return chosen


def _nothing_matched(patterns: Sequence[str], exclude: str | None, names: list[str]) -> str:
    what = ", ".join(repr(p) for p in patterns) + (f" (exclude {exclude!r})" if exclude else "")
    if not names:
        return f"targets {what} matched nothing: the model has no nn.Linear or Conv1D modules."
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})
    shown = ", ".join(names[:8]) + (", …" if len(names) > 8 else "")
    return (
        f"targets {what} matched no linear module. The model has {len(names)} linear modules "
        f"(names end in: {', '.join(suffixes)}), e.g. {shown}. Use a preset ({', '.join(PRESETS)}) "
        f"or a regex such as {suffixes[0]!r}."
    )
