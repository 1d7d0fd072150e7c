"""save_adapter / load_adapter: the svdkit adapter format.

A folder with ``svdkit.json`` (config, per-module scalings, flags, tensor shapes, fingerprints of the
base weights, version) and ``adapter.safetensors`` (every adapter tensor of every layer, trainable or
frozen: ``<module>.lora_A``, ``.lora_B``, the core's ``.core.*``, and for methods whose init is non-zero
the frozen ``.init_A``, ``.init_B``). Loading never recomputes an SVD: it rebuilds the layers from the
stored tensors, after checking that the base weights are the ones the adapter was made from.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from svdkit import __version__
from svdkit.adapters.api import _check_not_adapted, adapted_layers, install, state
from svdkit.core.registry import config_from_dict
from svdkit.core.fingerprint import combine, compare, fingerprint_dtype, tensor_fingerprint
from svdkit.core.files import atomic_dir
from svdkit.adapters.layers import Mode, SpectralLinear, weight_matrix

META, TENSORS, FORMAT = "svdkit.json", "adapter.safetensors", "svdkit-adapter"


class AdapterFormatError(ValueError):
    """An adapter folder that is incomplete, corrupt or not written by svdkit."""


class FingerprintMismatch(ValueError):
    """The base model's weights are not the ones the adapter was made from."""


def save_adapter(model: nn.Module, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write the adapter of an adapted model to the folder ``path`` (atomically)."""
    from safetensors.torch import save_file

    st = state(model)
    modules, tensors = {}, {}
    for name, layer in adapted_layers(model):
        own = {k: v.detach().cpu().contiguous() for k, v in layer.state_dict().items() if k not in ("weight", "bias")}
        modules[name] = {
            "shape": [layer.out_features, layer.in_features],
            "rank": layer.rank,
            "scaling": layer.scaling,
            "subtract": layer.init_A is not None,
            "trainable": sorted(layer.trainable),
            "fold": layer.folded,
            "weightless": layer.weightless,
            "dropout": getattr(layer.dropout, "p", 0.0),
            "fingerprint": layer.fingerprint,
            "tensors": {k: list(v.shape) for k, v in own.items()},
        }
        tensors.update({f"{name}.{k}": v for k, v in own.items()})
    meta = {
        "format": FORMAT,
        "svdkit_version": __version__,
        "config": st.config.to_dict(),
        "fingerprint": combine({n: m["fingerprint"] for n, m in modules.items()}),
        "modules": modules,
    }
    with atomic_dir(path, overwrite) as tmp:
        save_file(tensors, str(tmp / TENSORS), metadata={"format": FORMAT})
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
    return Path(path)


def read_adapter(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, tensors) of an adapter folder, with specific errors for missing or corrupt files."""
    from safetensors.torch import load_file

    path = Path(path)
    for file in (META, TENSORS):
        if not (path / file).is_file():
            raise FileNotFoundError(
                f"no svdkit adapter at {path}: {file} is missing (an adapter folder written by "
                "svdkit.save_adapter holds svdkit.json and adapter.safetensors)."
            )
    try:
        meta = json.loads((path / META).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterFormatError(f"{path / META} is not valid JSON ({exc}); the adapter is corrupt.") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "modules" not in meta:
        raise AdapterFormatError(f"{path / META} was not written by svdkit.save_adapter (no '{FORMAT}' format tag).")
    try:
        tensors = load_file(str(path / TENSORS))
    except Exception as exc:  # safetensors raises its own error types for truncated/garbled files
        raise AdapterFormatError(f"{path / TENSORS} cannot be read ({exc}); the adapter is corrupt.") from None
    return meta, tensors


def _check_base(model: nn.Module, modules: dict) -> dict[str, nn.Module]:
    found, problems, recast = {}, [], set()
    for name, info in modules.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            problems.append(f"{name}: not in this model")
            continue
        W = weight_matrix(module)
        if list(W.shape) != info["shape"]:
            problems.append(f"{name}: weight is {tuple(W.shape)}, adapter expects {tuple(info['shape'])}")
        elif (verdict := compare(W, info["fingerprint"])) == "different":
            now, then = tensor_fingerprint(W).split(":")[0], info["fingerprint"].split(":")[0]
            problems.append(f"{name}: weights differ (fingerprint {now} ≠ {then})")
        elif verdict == "dtype":
            recast.add((fingerprint_dtype(info["fingerprint"]), str(W.dtype).removeprefix("torch.")))
        found[name] = module
    if recast and not problems:
        pairs = ", ".join(f"{a} → {b}" for a, b in sorted(recast))
        warnings.warn(f"same weights, different dtype: the adapter was made on {pairs} weights of this model; "
                      "loading it (the outputs match the saved model up to that dtype's rounding).", stacklevel=3)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise FingerprintMismatch(
            f"this adapter was made from a different base model ({len(problems)} of {len(modules)} modules "
            f"do not match): {shown}. Load it onto the exact base weights it was trained on."
        )
    return found


_LAYER_FIELDS = ("shape", "scaling", "trainable", "fold", "dropout", "fingerprint", "tensors")


def _check_layer_info(path, name: str, info: dict, own: dict[str, torch.Tensor] | None = None) -> None:
    """The per-module record has every field, and (given its tensors) A (r × in) and B (out × r) fit the weight."""
    missing = [f for f in _LAYER_FIELDS if f not in info]
    if missing:
        raise AdapterFormatError(f"{Path(path) / META}: module {name} lacks {missing}; the adapter is corrupt.")
    if own is None:
        return
    out, inp = info["shape"]
    A, B = own.get("lora_A"), own.get("lora_B")
    if (A is not None and (A.ndim != 2 or A.shape[1] != inp)) or (B is not None and (B.ndim != 2 or B.shape[0] != out)):
        raise AdapterFormatError(f"{Path(path) / TENSORS}: {name}'s factors do not fit its {out}×{inp} weight; the adapter is corrupt.")


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Adapt ``model`` in place with the adapter saved at ``path``; outputs match the saved model exactly."""
    meta, tensors = read_adapter(path)
    _check_not_adapted(model)
    try:
        cfg = config_from_dict(meta["config"])
    except (TypeError, ValueError) as exc:
        raise AdapterFormatError(f"{Path(path) / META}: invalid config ({exc}).") from None
    modules = _check_base(model, meta["modules"])
    layers = {}
    for name, info in meta["modules"].items():
        _check_layer_info(path, name, info)
        own = {}
        for key, shape in info["tensors"].items():
            value = tensors.get(f"{name}.{key}")
            if value is None or list(value.shape) != shape:
                got = "missing" if value is None else f"shaped {tuple(value.shape)}"
                raise AdapterFormatError(f"{Path(path) / TENSORS}: {name}.{key} is {got}, expected {tuple(shape)}; the adapter is corrupt.")
            own[key] = value
        core = {k.split(".", 1)[1]: v for k, v in own.items() if k.startswith("core.")}
        _check_layer_info(path, name, info, own)
        try:
            layers[name] = SpectralLinear(
                modules[name], own.get("lora_A"), own.get("lora_B"), A0=own.get("init_A"), B0=own.get("init_B"),
                core=cfg.for_module(name).make_core(core) if core else None, bias="lora_bias" in own,
                mode=Mode.of(info.get("weightless", False), "init_A" in own),
                scaling=info["scaling"], trainable=frozenset(info["trainable"]), fold=info["fold"],
                dropout=info["dropout"], fingerprint=info["fingerprint"],
            )  # fmt: skip
        except ValueError as exc:  # the layer's and the core's own checks of their inputs (not bugs: TypeError etc.)
            raise AdapterFormatError(f"{Path(path)}: {name} cannot be rebuilt ({exc}); the adapter is corrupt.") from None
        if "lora_bias" in own:
            with torch.no_grad():
                layers[name].lora_bias.copy_(own["lora_bias"])
    install(model, cfg, layers)
    return model
