"""Merge recipes: the YAML ``svdkit merge`` reads, in mergekit's spirit.

    method: tsv-m                  # or merge_method (mergekit's key); svdkit.methods("merge")
    base: path/to/base             # or base_model; "default" = the embedded default model; omit for lore
    models:
      - model: path/to/finetuned_a # a Hugging Face folder, a PEFT LoRA folder or an svdkit adapter folder
        weight: 1.0                # or parameters: {weight: 1.0}
      - model: path/to/adapter_b
    parameters: {alpha: 1.0}       # the method's config fields (svdkit.config(method, **parameters))

Relative paths are taken from the current directory, else from the recipe's folder. Per-model parameters
other than ``weight`` (mergekit's per-model ``density``) are refused: svdkit's parameters are per merge.
"""

from __future__ import annotations

import os
from pathlib import Path


def _path(value, where: Path, field: str) -> str:
    if not isinstance(value, (str, os.PathLike)):
        raise ValueError(f"merge recipe: {field} must be a folder path, got {value!r}.")
    if str(value) == "default":
        from svdkit.core.models import default_model_dir

        return str(default_model_dir())
    path = Path(value).expanduser()
    if not path.exists() and not path.is_absolute() and (where / path).exists():
        path = where / path
    if not path.exists():
        raise FileNotFoundError(f"merge recipe: {field} {str(value)!r} does not exist (relative paths are taken from the current directory or the recipe's folder).")
    return str(path)


def read_recipe(file: str | os.PathLike) -> dict:
    """{"cfg", "base", "models", "weights", "text"} from a recipe file, with errors naming the bad field."""
    import yaml

    from svdkit.core.registry import config

    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"merge recipe {file} does not exist.")
    text = file.read_text()
    data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"{file}: a merge recipe is a YAML mapping with method, base, models, parameters.")
    unknown = set(data) - {"method", "merge_method", "base", "base_model", "models", "parameters", "dtype"}
    if unknown:
        raise ValueError(f"{file}: unknown key(s) {sorted(unknown)}; a recipe has method, base, models, parameters.")
    method = data.get("method", data.get("merge_method"))
    if not method:
        raise ValueError(f"{file}: no method (e.g. `method: tsv-m`; see `svdkit methods --kind merge`).")
    params = data.get("parameters") or {}
    if not isinstance(params, dict):
        raise ValueError(f"{file}: parameters must be a mapping of the method's options, got {params!r}.")
    try:
        cfg = config(str(method), **params)
    except TypeError as exc:  # an unknown option: a mistake in the recipe, reported as one line
        raise ValueError(f"{file}: {exc}") from None
    if cfg.kind != "merge":
        raise ValueError(f"{file}: {method!r} is a {cfg.kind} method, not a merge method (`svdkit methods --kind merge`).")
    models, weights = [], []
    for i, entry in enumerate(data.get("models") or []):
        entry = {"model": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict) or "model" not in entry:
            raise ValueError(f"{file}: models[{i}] must be a path or a mapping with `model:`.")
        per_model = dict(entry.get("parameters") or {})
        weight = entry.get("weight", per_model.pop("weight", 1.0))
        if per_model or set(entry) - {"model", "weight", "parameters"}:
            extra = sorted(set(per_model) | (set(entry) - {"model", "weight", "parameters"}))
            raise ValueError(f"{file}: models[{i}] has {extra}; only `weight` is per model, the method's options go under `parameters`.")
        models.append(_path(entry["model"], file.parent, f"models[{i}]"))
        weights.append(float(weight))
    base = data.get("base", data.get("base_model"))
    base = None if base is None else _path(base, file.parent, "base")
    return {"cfg": cfg, "base": base, "models": models, "weights": weights, "text": text}
