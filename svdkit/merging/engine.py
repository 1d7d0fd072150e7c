"""merge_models: the streaming merge engine.

For every tensor name of the base checkpoint, in order: read the base tensor and the T inputs' versions of
it (memory-mapped safetensors, an in-memory model's tensor, or a LoRA's B A), form the task deltas
Δ_t = W_t − W_0 in fp32 (fp64 if the method asks), let the method merge them, and write W_0 + Δ (in the
base's dtype) straight into the output shard. Peak memory is about T + 2 copies of the largest tensor plus
one SVD's workspace, whatever the model size (an svdkit adapter input also holds its adapted modules' base
weights once, to rebuild the adapter). LoRA-native methods (KnOTS, Core Space) merge LoRA inputs through
their factors, never forming an m × n task matrix.

Errors name the tensor and the input: different architectures, missing tensors, shapes, LoRAs made for
another base (shape, and the fingerprint svdkit adapters carry), α ≤ 0, too few models, an existing output.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from svdkit.core.files import atomic_dir, check_replaceable
from svdkit.core.linalg_merge import relative_error, thin_svd
from svdkit.merging.common import compute_dtype, dense_factors, is_matrix
from svdkit.merging.sources import Checkpoint, LoraUpdate, open_checkpoint, open_input
from svdkit.merging.writer import ShardedWriter, copy_side_files, parse_size, write_peft_lora

MARKER, FORMAT = "svdkit_merge.json", "svdkit-merge"


def _check_request(cfg, models: list, weights, base) -> list[float]:
    if getattr(cfg, "delta_compression", False):
        raise ValueError(f"{cfg.name} compresses one task vector: use svdkit.compress_delta(base, finetuned, cfg).")
    if getattr(cfg, "kind", None) != "merge":
        raise ValueError(f"merge_models needs a merge method's config (svdkit.methods('merge')), got {type(cfg).__name__}.")
    if not isinstance(models, (list, tuple)) or len(models) < cfg.min_models:
        raise ValueError(f"{cfg.name} needs at least {cfg.min_models} fine-tuned model(s), got {len(models) if isinstance(models, (list, tuple)) else models!r}.")
    if base is None and not cfg.base_free:
        raise ValueError(f"{cfg.name} needs the base model the inputs were fine-tuned from (base=None is only for base-free methods: lore).")
    if base is not None and cfg.base_free:
        raise ValueError(f"{cfg.name} is base-free: pass base=None (the first model provides config and tokenizer).")
    weights = [1.0] * len(models) if weights is None else [float(w) for w in weights]
    if len(weights) != len(models) or not all(math.isfinite(w) for w in weights):
        raise ValueError(f"weights must be {len(models)} finite numbers, one per model; got {weights}.")
    return weights


def _check_out(out, overwrite: bool, entries: list) -> Path:
    path = Path(out)
    for entry in entries:
        if isinstance(entry, (str, os.PathLike)) and Path(entry).resolve() == path.resolve():
            raise ValueError(f"out={path} is one of the merge's inputs; inputs are never modified: choose another folder.")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{path} already exists; pass overwrite=True (--overwrite) to replace a folder svdkit wrote, or choose another.")
        check_replaceable(path)  # before any work: only a folder svdkit wrote is replaced
    return path


def _check_compatible(template: Checkpoint, inputs: list) -> None:
    keys = set(template.keys())
    arch = (template.config.get("model_type"), tuple(template.config.get("architectures") or ()))
    for inp in inputs:
        if isinstance(inp, LoraUpdate):
            extra = sorted(inp.keys() - keys)
            if extra:
                raise ValueError(f"{inp.label} updates tensor(s) the base does not have: {extra[:3]}.")
            continue
        other = (inp.config.get("model_type"), tuple(inp.config.get("architectures") or ()))
        if all(arch) and all(other) and arch != other:
            raise ValueError(f"{inp.label} is a {other[0]} {list(other[1])}, the base {template.label} a {arch[0]} "
                             f"{list(arch[1])}: models of different architectures cannot be merged.")  # fmt: skip
        missing, extra = sorted(keys - set(inp.keys())), sorted(set(inp.keys()) - keys)
        if missing or extra:
            raise ValueError(f"{inp.label} and {template.label} have different tensors: missing {missing[:3]}, extra "
                             f"{extra[:3]}; they are not the same architecture.")  # fmt: skip
        for key in template.keys():
            if inp.shape(key) != template.shape(key):
                raise ValueError(f"tensor {key}: {inp.label} has shape {inp.shape(key)}, {template.label} has "
                                 f"{template.shape(key)}; models with different shapes cannot be merged.")  # fmt: skip


def _task_tensors(key: str, W0: Tensor | None, inputs: list, dtype: torch.dtype) -> list[Tensor | None]:
    """Δ_t (or θ_t when W0 is None: base-free); None for an input that leaves the tensor unchanged."""
    out = []
    for inp in inputs:
        if isinstance(inp, LoraUpdate):
            out.append(inp.delta(key, dtype))
        else:
            x = inp.get(key).to(dtype)
            out.append(x if W0 is None else x - W0)
    return out


def _factors(key: str, W0: Tensor, inputs: list, weights: list[float], dtype: torch.dtype) -> list[tuple[Tensor, Tensor]]:
    """Each input's (w_t B_t, A_t) for a LoRA-native merge: LoRA factors as they are, dense deltas by SVD."""
    out = []
    for inp, w in zip(inputs, weights):
        if isinstance(inp, LoraUpdate) and key in inp.factors:
            B, A = inp.factors[key]
            out.append((w * B.to(dtype), A.to(dtype)))
        elif isinstance(inp, LoraUpdate) and key not in inp.dense:
            out.append((W0.new_zeros(W0.shape[0], 0), W0.new_zeros(0, W0.shape[1])))
        else:
            out.append(dense_factors(w * _task_tensors(key, W0, [inp], dtype)[0]))
    return out


def _lora_rank(key: str, inputs: list, shape) -> int:
    return min(min(shape), sum(inp.rank(key) for inp in inputs if isinstance(inp, LoraUpdate)))


def result_model(template: Checkpoint) -> nn.Module:
    """A writable copy of the template model: a deep copy of an in-memory model, or the folder loaded (fp32)."""
    if template.model is not None:
        return copy.deepcopy(template.model)
    import transformers as tf

    arch = (template.config.get("architectures") or [None])[0]  # the class the folder was saved from (GPT2LMHeadModel, …)
    cls = getattr(tf, arch, None) if arch else None
    return (cls or tf.AutoModel).from_pretrained(str(template.folder), dtype=torch.float32, local_files_only=True).eval()


def _delta_stream(template: Checkpoint, inputs: list, dtype: torch.dtype):
    for key in template.keys():
        if template.dtype(key).is_floating_point:
            W0 = template.get(key).to(dtype)
            yield [W0.new_zeros(W0.shape) if d is None else d for d in _task_tensors(key, W0, inputs, dtype)]


def merge_models(base, models: list, cfg, weights: list[float] | None = None, out: str | os.PathLike | None = None, *,
                 overwrite: bool = False, lora_out: bool = False, shard_size: int | str = "2GB", tokenizer=None,
                 recipe: str | None = None, progress: bool | None = None):  # fmt: skip
    """Merge fine-tuned ``models`` into ``base`` with the merge method ``cfg`` (``svdkit.config("tsv-m")``).

    ``base``: an ``nn.Module`` or a Hugging Face folder (None for base-free methods: lore). ``models``: each an
    ``nn.Module``, a Hugging Face folder (sharded or not), a PEFT LoRA folder or an svdkit adapter folder.
    ``weights``: one per model (default 1). Returns the merged model (``out=None``; a copy, the inputs are
    untouched) or the folder ``out``: safetensors shards (≤ ``shard_size``) + index, the base's config and
    tokenizer files, ``svdkit_merge.json`` (what was done), ``README.md``, and ``merge.yaml`` (``recipe``).
    ``lora_out=True`` also writes ``out/lora``: the merged update of the LoRA-adapted weights as one PEFT LoRA
    (exact for KnOTS and Core Space; otherwise a truncated SVD at the inputs' total rank, error reported).
    """
    from tqdm.auto import tqdm

    start = time.perf_counter()
    weights = _check_request(cfg, models, weights, base)
    path = None if out is None else _check_out(out, overwrite, [base, *models])
    base_ckpt = None if base is None else open_checkpoint(base, f"base {base if isinstance(base, (str, os.PathLike)) else '<model>'}")
    inputs = [open_input(m, base_ckpt) for m in models]
    if cfg.base_free and any(isinstance(i, LoraUpdate) for i in inputs):
        raise ValueError(f"{cfg.name} is base-free and needs full checkpoints; adapters are relative to a base.")
    template = base_ckpt or inputs[0]
    _check_compatible(template, [i for i in inputs if i is not template])
    if lora_out and (out is None or not any(isinstance(i, LoraUpdate) for i in inputs)):
        raise ValueError("lora_out needs an out folder and at least one LoRA (PEFT or svdkit adapter) input.")
    dtype = compute_dtype(cfg)
    state = cfg.prepare(_delta_stream(template, inputs, dtype)) if getattr(cfg, "needs_prepass", False) else None
    result = result_model(template) if out is None else None
    targets = result.state_dict(keep_vars=True) if result is not None else None
    specs = [(k, template.shape(k), template.dtype(k)) for k in template.keys()]
    lora, lora_errors, changed = {}, {}, 0
    with atomic_dir(path, overwrite) if path is not None else _nothing() as tmp:
        writer = ShardedWriter(tmp, specs, parse_size(shard_size)) if tmp is not None else None
        for key in tqdm(writer.order if writer else template.keys(), desc=f"merge {cfg.name}", disable=None if progress is None else not progress):
            W0 = template.get(key)
            merged = W0
            if W0.dtype.is_floating_point:
                merged, factors = _merge_one(cfg, key, W0, inputs, weights, dtype, state, lora_out)
                changed += merged is not W0
                if factors is not None:
                    lora[key], err = factors
                    if err is not None:
                        lora_errors[key] = err
            if writer is not None:
                writer.write(key, merged)
            else:
                if key not in targets:
                    raise ValueError(f"the merged model has no parameter {key!r} (checkpoint and model naming differ).")
                with torch.no_grad():
                    targets[key].copy_(merged)
        if tmp is None:
            return result
        writer.close()
        _write_side_files(tmp, template, tokenizer, recipe)
        if lora:
            transposed = set().union(*(i.transposed for i in inputs if isinstance(i, LoraUpdate)))
            task = "CAUSAL_LM" if any(a.endswith("ForCausalLM") for a in template.config.get("architectures") or ()) else None
            write_peft_lora(tmp / "lora", lora, transposed, task)
        report = {"format": FORMAT, "method": cfg.to_dict(), "base": _label(base), "models": [_label(m) for m in models],
                  "weights": weights, "tensors": len(specs), "tensors_changed": changed, "shards": writer.names,
                  "seconds": round(time.perf_counter() - start, 3),
                  "lora": ({"modules": len(lora), "exact": not lora_errors, "max_relative_error": max(lora_errors.values(), default=0.0),
                            "relative_error": lora_errors} if lora else None)}  # fmt: skip
        (tmp / MARKER).write_text(json.dumps(report, indent=2) + "\n")
        (tmp / "README.md").write_text(_readme(report))
    return path


def _merge_one(cfg, key, W0, inputs, weights, dtype, state, lora_out):
    """(merged tensor in W0's dtype, (LoRA factors, truncation error) or None)."""
    base_free = cfg.base_free
    W = W0.to(dtype)
    lora_key = any(isinstance(i, LoraUpdate) and key in i.factors for i in inputs) and is_matrix(W)
    if cfg.lora_native and lora_key:
        B, A = cfg.merge_factors(_factors(key, W, inputs, weights, dtype), key)
        return (W + B @ A).to(W0.dtype), ((B.float().contiguous(), A.float().contiguous()), None) if lora_out else None
    tensors = _task_tensors(key, None if base_free else W, inputs, dtype)
    if not base_free and all(t is None or not t.any() for t in tensors):
        return W0, None  # no input changes this tensor (LoRAs elsewhere, frozen embeddings): nothing to decompose
    tensors = [W.new_zeros(W.shape) if t is None else t for t in tensors]
    merged = cfg.merge(tensors, weights, key, state)
    out = merged if base_free else W + merged
    factors = None
    if lora_out and lora_key:
        U, S, Vh = thin_svd(merged)
        r = max(1, _lora_rank(key, inputs, merged.shape))
        B, A = U[:, :r] * S[:r], Vh[:r]
        factors = ((B.float().contiguous(), A.float().contiguous()), relative_error(merged, B @ A))
    return out.to(W0.dtype), factors


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _label(entry) -> str:
    return str(entry) if isinstance(entry, (str, os.PathLike)) or entry is None else f"<{type(entry).__name__}>"


def _write_side_files(tmp: Path, template: Checkpoint, tokenizer, recipe: str | None) -> None:
    if template.folder is not None:
        copy_side_files(template.folder, tmp)
    elif template.model is not None and hasattr(getattr(template.model, "config", None), "save_pretrained"):
        template.model.config.save_pretrained(str(tmp))
        gen = getattr(template.model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(str(tmp))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    if recipe is not None:
        (tmp / "merge.yaml").write_text(recipe)


def _readme(report: dict) -> str:
    m = report["method"]
    lines = [f"# Merged with svdkit: {m['_type']}", "", f"- base: `{report['base']}`",
             *[f"- model: `{x}` (weight {w:g})" for x, w in zip(report["models"], report["weights"])],
             f"- parameters: {', '.join(f'{k}={v}' for k, v in m.items() if not k.startswith('_'))}",
             f"- tensors: {report['tensors']} ({report['tensors_changed']} changed), shards: {len(report['shards'])}",
             f"- time: {report['seconds']:.1f} s"]  # fmt: skip
    if report["lora"]:
        lora = report["lora"]
        what = "exact" if lora["exact"] else f"truncated, max relative error {lora['max_relative_error']:.3g}"
        lines.append(f"- merged LoRA in `lora/`: {lora['modules']} modules, {what}")
    return "\n".join(lines) + "\n\nLoad it with `AutoModelForCausalLM.from_pretrained(folder)`.\n"
