"""Nested training state (optimizer and scheduler state dicts, RNG states, counters) saved without pickle.

The tensors go to ``state.safetensors``, everything else to ``state.json`` with a placeholder for each
tensor, so reading a checkpoint can never run code (a pickled ``torch.save`` file read by a full unpickler
can run arbitrary objects' code). Tuples and dicts with non-string keys (an optimizer's per-parameter state is keyed by
int) are tagged so that they read back as they were.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

TENSORS, META, FORMAT = "state.safetensors", "state.json", "svdkit-state"
STATE = META  # the file that marks a complete checkpoint state


def _encode(value: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = value.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _encode(v, tensors, f"{where}.{k}") for k, v in value.items()}
        return {"__items__": [[_encode(k, tensors, where), _encode(v, tensors, f"{where}[{k!r}]")] for k, v in value.items()]}
    raise TypeError(f"checkpoint state {where} is a {type(value).__name__}; only tensors, numbers, strings, "
                    "lists, tuples and dicts can be saved (nothing is pickled).")  # fmt: skip


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if "__tuple__" in value:
        return tuple(_decode(v, tensors) for v in value["__tuple__"])
    if "__items__" in value:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in value["__items__"]}
    return {k: _decode(v, tensors) for k, v in value.items()}


def save_state(folder: str | os.PathLike, state: dict) -> None:
    """Write ``state`` into ``folder`` (which must exist: write into an ``atomic_dir``) as tensors + JSON."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    meta = {"format": FORMAT, "state": _encode(state, tensors, "state")}
    save_file(tensors, str(Path(folder) / TENSORS), metadata={"format": FORMAT})
    (Path(folder) / META).write_text(json.dumps(meta) + "\n")


def load_state(folder: str | os.PathLike) -> dict:
    """Inverse of :func:`save_state` (no pickle)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    for file in (META, TENSORS):
        if not (folder / file).is_file():
            raise FileNotFoundError(f"{folder / file} is missing: the checkpoint is incomplete; start without --resume.")
    meta = json.loads((folder / META).read_text())
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{folder / META} was not written by svdkit (no '{FORMAT}' format tag).")
    return _decode(meta["state"], load_file(str(folder / TENSORS)))
