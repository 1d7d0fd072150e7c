"""The inputs of a merge, read tensor by tensor: Hugging Face folders, in-memory models, PEFT LoRA folders and
svdkit adapter folders.

- :class:`Checkpoint`: full weights by tensor name. A folder's safetensors files (one, or shards listed in
  ``model.safetensors.index.json``) are opened with ``safetensors.safe_open`` (memory-mapped): a tensor is read
  when asked for and nothing else is loaded. An in-memory model is read from its ``state_dict`` (tied tensors
  once, under their first name).
- :class:`LoraUpdate`: a low-rank update per tensor, Δ = B A, in the checkpoint's storage orientation (GPT-2's
  ``Conv1D`` stores Wᵀ, so its factors are transposed here), scaling folded into B; plus dense updates for
  tensors an adapter changes at full rank. Read from a PEFT LoRA folder (``adapter_config.json`` +
  ``adapter_model.safetensors``) or an svdkit adapter folder (``svdkit.json`` + ``adapter.safetensors``,
  whose per-module fingerprints are checked against the base).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch
from torch import Tensor, nn

ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}  # fmt: skip
WEIGHT_INDEX, WEIGHT_FILE = "model.safetensors.index.json", "model.safetensors"


class Checkpoint:
    """Full weights by name, from a folder (memory-mapped) or an in-memory model; nothing is modified."""

    def __init__(self, label: str, *, files: dict[str, Path] | None = None, tensors: dict[str, Tensor] | None = None,
                 folder: Path | None = None, config: dict | None = None, model: nn.Module | None = None):  # fmt: skip
        self.label, self.folder, self.config, self.model = label, folder, config or {}, model
        self._files, self._tensors, self._handles = files, tensors, {}
        self._meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        if tensors is not None:
            self._meta = {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}
        else:
            for key, path in files.items():
                sl = self._handle(path).get_slice(key)
                self._meta[key] = (tuple(sl.get_shape()), ST_DTYPES.get(sl.get_dtype(), torch.uint8))

    def _handle(self, path: Path):
        from safetensors import safe_open

        if path not in self._handles:
            self._handles[path] = safe_open(str(path), framework="pt", device="cpu")
        return self._handles[path]

    def keys(self) -> list[str]:
        return list(self._meta)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._meta[key][0]

    def dtype(self, key: str) -> torch.dtype:
        return self._meta[key][1]

    def get(self, key: str) -> Tensor:
        if key not in self._meta:
            raise KeyError(f"{self.label} has no tensor {key!r}.")
        if self._tensors is not None:
            return self._tensors[key].detach()
        return self._handle(self._files[key]).get_tensor(key)


class LoraUpdate:
    """Low-rank (and dense) updates by tensor name, in storage orientation; Δ = B A (scaling folded into B)."""

    def __init__(self, label: str, factors: dict[str, tuple[Tensor, Tensor]], dense: dict[str, Tensor], transposed: set[str]):
        self.label, self.factors, self.dense, self.transposed = label, factors, dense, transposed

    def keys(self) -> set[str]:
        return set(self.factors) | set(self.dense)

    def rank(self, key: str) -> int:
        return self.factors[key][0].shape[1] if key in self.factors else 0

    def delta(self, key: str, dtype: torch.dtype) -> Tensor | None:
        """Δ for ``key`` (None: this input leaves the tensor unchanged)."""
        if key in self.factors:
            B, A = self.factors[key]
            return B.to(dtype) @ A.to(dtype)
        return self.dense[key].to(dtype) if key in self.dense else None


def open_checkpoint(entry, label: str | None = None) -> Checkpoint:
    """A :class:`Checkpoint` for an ``nn.Module`` or a Hugging Face folder with safetensors weights."""
    if isinstance(entry, nn.Module):
        tensors, seen = {}, set()
        for key, value in entry.state_dict().items():
            ident = (value.data_ptr(), tuple(value.shape), value.dtype) if value.numel() else None
            if ident is not None and ident in seen:  # tied (e.g. lm_head = embed_tokens): keep the first name
                continue
            seen.add(ident)
            tensors[key] = value
        cfg = getattr(entry, "config", None)
        config = cfg.to_dict() if hasattr(cfg, "to_dict") else {}
        return Checkpoint(label or f"<{type(entry).__name__}>", tensors=tensors, config=config, model=entry)
    folder = Path(entry).expanduser()
    label = label or str(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"merge input {label!r} is not a folder or a model (pass an nn.Module, a Hugging Face "
                                "folder, a PEFT LoRA folder or an svdkit adapter folder).")  # fmt: skip
    if (folder / WEIGHT_INDEX).is_file():
        weight_map = json.loads((folder / WEIGHT_INDEX).read_text())["weight_map"]
        files = {key: folder / name for key, name in weight_map.items()}
    else:
        shards = [folder / WEIGHT_FILE] if (folder / WEIGHT_FILE).is_file() else sorted(folder.glob("*.safetensors"))
        if not shards:
            binary = sorted(p.name for p in folder.glob("*.bin"))
            hint = f" It has {binary[0]}: re-save it with save_pretrained(..., safe_serialization=True)." if binary else ""
            raise FileNotFoundError(f"{label}: no safetensors weights (model.safetensors or an index).{hint}")
        files = {}
        for shard in shards:
            from safetensors import safe_open

            with safe_open(str(shard), framework="pt") as f:
                files.update({key: shard for key in f.keys()})
    missing = sorted({str(p) for p in files.values() if not p.is_file()})
    if missing:
        raise FileNotFoundError(f"{label}: the index lists shard(s) that are missing: {', '.join(missing)}.")
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    return Checkpoint(label, files=files, folder=folder, config=config)


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank/alpha pattern lookup: the first pattern p with module matching ``(.*\\.)?(p)$``."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def read_peft(folder: Path, base: Checkpoint) -> LoraUpdate:
    """A PEFT LoRA folder as low-rank updates of ``base``'s tensors (scaling α/r or α/√r folded into B)."""
    from safetensors.torch import load_file

    cfg = json.loads((folder / "adapter_config.json").read_text())
    if cfg.get("peft_type", "LORA") != "LORA" or cfg.get("use_dora"):
        raise ValueError(f"{folder}: only plain LoRA adapters merge (peft_type={cfg.get('peft_type')!r}, "
                         f"use_dora={cfg.get('use_dora')}); merge DoRA/other adapters into the model first.")  # fmt: skip
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{folder}: adapter_model.safetensors is missing (a .bin adapter must be re-saved as safetensors).")
    pairs: dict[str, dict[str, Tensor]] = {}
    for key, value in load_file(str(weights)).items():
        m = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
        if m is None:
            raise ValueError(f"{folder}: tensor {key!r} is not a LoRA factor (modules_to_save, embeddings and "
                             "biases in adapters are not supported by svdkit merge).")  # fmt: skip
        pairs.setdefault(m.group(1), {})[m.group(2)] = value
    fan_in_fan_out, factors = bool(cfg.get("fan_in_fan_out")), {}
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{folder}: module {module} has lora_{next(iter(ab))} but not its partner; the adapter is incomplete.")
        A, B = ab["A"].float(), ab["B"].float()
        r = A.shape[0]
        alpha = _pattern_value(cfg.get("alpha_pattern"), module, cfg.get("lora_alpha", r))
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        key = f"{module}.weight"
        expected = (A.shape[1], B.shape[0]) if fan_in_fan_out else (B.shape[0], A.shape[1])
        if key not in base.keys():
            raise ValueError(f"{folder}: LoRA module {module} has no weight {key!r} in the base {base.label}; "
                             "the adapter was made for a different architecture.")  # fmt: skip
        if base.shape(key) != expected:
            raise ValueError(f"{folder}: LoRA of {key} implies shape {expected}, the base {base.label} has "
                             f"{base.shape(key)}; the adapter was made for a different base model.")  # fmt: skip
        factors[key] = (scale * A.mT, B.mT) if fan_in_fan_out else (scale * B, A)
    return LoraUpdate(str(folder), factors, {}, set(factors) if fan_in_fan_out else set())


def _attach(root: nn.Module, name: str, module: nn.Module) -> None:
    parent = root
    for part in name.split(".")[:-1]:
        if not hasattr(parent, part):
            parent.add_module(part, nn.Module())
        parent = getattr(parent, part)
    parent.add_module(name.split(".")[-1], module)


def read_svdkit_adapter(folder: Path, base: Checkpoint) -> LoraUpdate:
    """An svdkit adapter folder as updates of ``base``: exact LoRA factors where the method's update is
    low-rank (``export_peft``'s factors), else its dense ΔW. The adapted modules are rebuilt on their base
    weights (this holds those weights in memory once); each module's fingerprint must match the base."""
    from svdkit.adapters.api import adapted_layers, state
    from svdkit.adapters.export import lora_factors
    from svdkit.adapters.saving import FingerprintMismatch, load_adapter, read_adapter
    from svdkit.core.fingerprint import tensor_fingerprint

    meta, _ = read_adapter(folder)
    root, transposed = nn.Module(), {}
    for name, info in meta["modules"].items():
        key, (out, inn) = f"{name}.weight", info["shape"]
        if key not in base.keys():
            raise FingerprintMismatch(f"{folder}: adapted module {name} has no weight {key!r} in the base {base.label}.")
        W = base.get(key)
        options = [(W, False)] * (tuple(W.shape) == (out, inn)) + [(W.T, True)] * (tuple(W.shape) == (inn, out))
        match = [(w, t) for w, t in options if tensor_fingerprint(w) == info["fingerprint"]]
        if not match:
            raise FingerprintMismatch(f"{folder}: module {name} was adapted from different weights than {key} of the "
                                      f"base {base.label} (fingerprint or shape {tuple(W.shape)} differs); merge it "
                                      "onto the base it was trained from.")  # fmt: skip
        with torch.device("meta"):
            linear = nn.Linear(inn, out, bias=False)
        linear.weight = nn.Parameter(match[0][0], requires_grad=False)
        transposed[name] = match[0][1]
        _attach(root, name, linear)
    load_adapter(root, folder)
    cfg = state(root).config
    factors, dense = {}, {}
    with torch.no_grad():
        for name, layer in adapted_layers(root):
            key, t = f"{name}.weight", transposed[name]
            if cfg.exports_lora:
                A, B = lora_factors(layer, prune=cfg.prunes)
                B, A = layer.scaling * B.float(), A.float()
                factors[key] = (A.mT, B.mT) if t else (B, A)
            else:
                d = layer.delta_weight().float()
                dense[key] = d.T if t else d
            if layer.lora_bias is not None:
                dense[f"{name}.bias"] = layer.lora_bias.detach().float()
    return LoraUpdate(str(folder), factors, dense, {f"{n}.weight" for n, t in transposed.items() if t})


def open_input(entry, base: Checkpoint | None):
    """A Checkpoint or a LoraUpdate for one merge input (model, HF folder, PEFT folder, svdkit adapter)."""
    if isinstance(entry, nn.Module):
        return open_checkpoint(entry)
    folder = Path(entry).expanduser() if isinstance(entry, (str, os.PathLike)) else None
    if folder is None:
        raise TypeError(f"merge input of type {type(entry).__name__}: pass an nn.Module or a folder path.")
    is_peft, is_svdkit = (folder / "adapter_config.json").is_file(), (folder / "svdkit.json").is_file() and (folder / "adapter.safetensors").is_file()
    if (is_peft or is_svdkit) and base is None:
        raise ValueError(f"{folder} is an adapter: it needs the base model it was trained on (base=None is only for "
                         "base-free methods on full checkpoints).")  # fmt: skip
    if is_peft:
        return read_peft(folder, base)
    if is_svdkit:
        return read_svdkit_adapter(folder, base)
    return open_checkpoint(folder)
