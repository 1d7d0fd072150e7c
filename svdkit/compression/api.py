"""``svdkit.compress``, ``svdkit.save_compressed``, ``svdkit.load_compressed``: low-rank compression of a model.

    cfg = svdkit.config("svd-llm", ratio=0.2)
    report = svdkit.compress(model, cfg, calibration=batches)     # or a Calibration from svdkit.calibrate
    svdkit.save_compressed(model, "out/small", tokenizer=tok)     # safetensors + config.json + svdkit.json
    model = svdkit.load_compressed("out/small")

``calibration`` may be a :class:`svdkit.Calibration` (every module's statistics, measured beforehand) or
the calibration batches themselves (a list of dicts the model takes): whitening methods then calibrate
and compress block by block, holding one block's covariances at a time (:mod:`svdkit.compression.streaming`);
the others run ``svdkit.calibrate`` (their statistics are vectors).
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from svdkit.adapters.layers import weight_matrix
from svdkit.compression.config import CompressConfig
from svdkit.compression.engine import _LAST, compress_module, spectrum
from svdkit.compression.layers import TYPES
from svdkit.compression.report import CompressionReport
from svdkit.compression.streaming import blocks_of, in_blocks, layerwise
from svdkit.core.calibration import Calibration, calibrate
from svdkit.core.files import atomic_dir, write_text
from svdkit.core.registry import config_from_dict
from svdkit.core.targets import select_targets

FORMAT = "svdkit-compressed"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"


def _check_config(cfg) -> None:
    if not isinstance(cfg, CompressConfig):
        raise TypeError(f"svdkit.compress needs a compression config (svdkit.methods('compress')), got "
                        f"{type(cfg).__name__}; adapters go through svdkit.adapt.")  # fmt: skip


def compress(model: nn.Module, cfg, calibration=None, *, progress: bool | None = None) -> CompressionReport:
    """Replace ``cfg``'s target linears of ``model`` by rank-k factorizations, in place; returns the report.

    ``calibration``: a :class:`svdkit.Calibration` or the calibration batches (see the module docstring);
    required by data-aware methods, refused by data-free ones. Nothing is changed when an error is raised
    before the first module is replaced (bad config, missing or mismatched statistics).
    """
    _check_config(cfg)
    try:
        return _compress(model, cfg, calibration, progress)
    finally:
        _LAST.clear()  # the transform reused across modules that share statistics


def _compress(model, cfg, calibration, progress) -> CompressionReport:
    if getattr(model, "_svdkit", None) is not None:
        raise ValueError("compress the base model, not an adapted one (svdkit.merge or svdkit.unadapt it first).")
    targets = select_targets(model, cfg.targets, cfg.exclude)
    shapes = {name: tuple(weight_matrix(m).shape) for name, m in targets}
    report = CompressionReport(cfg.name, cfg.to_dict())
    start = time.perf_counter()
    if cfg.uses_calibration and calibration is None:
        raise ValueError(f"{type(cfg).__name__} is data-aware: pass calibration=batches (a list of dicts with "
                         "input_ids) or calibration=svdkit.calibrate(model, batches, cfg).")  # fmt: skip
    if not cfg.uses_calibration and calibration is not None:
        raise ValueError(f"{type(cfg).__name__} is data-free; call svdkit.compress(model, cfg) without calibration.")
    if cfg.structured:  # rewrites groups of modules together (clover-prune: v_proj with o_proj)
        report.rows = cfg.compress_model(model, targets, progress)
        report.seconds = time.perf_counter() - start
        return report
    if getattr(cfg, "update", False) and isinstance(calibration, Calibration):
        raise ValueError("update=True re-solves each factor on the compressed model's inputs, which only the "
                         "layer-by-layer path sees: pass calibration=batches instead of precomputed statistics.")  # fmt: skip
    if calibration is not None and not isinstance(calibration, Calibration):
        batches = list(calibration)
        if not batches or not all(isinstance(b, dict) and "input_ids" in b for b in batches):
            raise ValueError("calibration batches must be a non-empty list of dicts with input_ids "
                             "(and attention_mask; labels for gradient statistics).")  # fmt: skip
        streamable = in_blocks(model, targets)
        if getattr(cfg, "update", False) and not streamable:
            blocks_of(model, targets)  # raises: names the target outside the blocks
        if cfg.whitening and streamable:
            report.mode = "layer by layer"
            spectra = layerwise(model, cfg, targets, batches, None, progress)[1] if cfg.needs_spectra else {}
            ranks = cfg.allocate(spectra, shapes)
            rows, _, peak, total = layerwise(model, cfg, targets, batches, ranks, progress)
            report.rows, report.statistics_peak_bytes, report.statistics_total_bytes = rows, peak, total
            report.seconds = time.perf_counter() - start
            return report
        calibration = calibrate(model, batches, cfg, progress=progress)
    if calibration is not None:
        calibration.check(cfg, targets)
        report.mode = "precomputed statistics"
        held = sum(t.numel() * t.element_size() for d in calibration.tensors.values() for t in d.values())
        report.statistics_peak_bytes = report.statistics_total_bytes = held
    stats = {name: (calibration[name] if calibration is not None else None) for name, _ in targets}
    spectra = {name: spectrum(cfg, name, m, stats[name]) for name, m in targets} if cfg.needs_spectra else {}
    ranks = cfg.allocate(spectra, shapes)
    for name, module in targets:
        cov = stats[name].get("covariance") if stats[name] is not None else None
        report.rows.append(compress_module(model, cfg, name, module, ranks[name], stats[name], cov))
    report.seconds = time.perf_counter() - start
    return report


# -- files ------------------------------------------------------------------------------------------
def _factored(model: nn.Module) -> dict[str, nn.Module]:
    """The compressed modules (every type in :data:`svdkit.compression.layers.TYPES`) by name."""
    kinds = tuple(TYPES.values())
    return {name: m for name, m in model.named_modules() if isinstance(m, kinds)}


def save_compressed(model: nn.Module, path: str | os.PathLike, *, tokenizer=None, config=None, report=None,
                    dense: bool = False, overwrite: bool = False) -> Path:  # fmt: skip
    """Write a compressed model: ``model.safetensors`` (factors and every other tensor), the Hugging Face
    ``config.json``, ``svdkit.json`` (format, architecture, every factored module's rank) and the tokenizer.

    Nothing is pickled; the folder appears whole or not at all (:func:`svdkit.core.files.atomic_dir`).
    ``config``: the compression config (recorded); ``report``: a CompressionReport or markdown text, written
    as report.md; ``dense``: also write ``dense/``, plain weights W' = A·B (:func:`save_dense`).
    """
    from safetensors.torch import save_file

    modules = _factored(model)
    if not modules:
        raise ValueError("the model has no compressed (LowRankLinear, PrunedValue/PrunedOutput) modules: run "
                         "svdkit.compress first.")  # fmt: skip
    if not hasattr(model, "config") or not hasattr(model.config, "save_pretrained"):
        raise ValueError("save_compressed needs a Hugging Face model (with .config) to rebuild it at load time.")
    state, seen = {}, {}
    for key, t in model.state_dict().items():
        ptr = (t.data_ptr(), t.shape, t.dtype)
        if t.numel() and ptr in seen:  # tied weights (lm_head = embed_tokens) are stored once
            continue
        seen[ptr] = key
        state[key] = t.detach().cpu().contiguous()
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "architecture": type(model).__name__,
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "modules": {name: m.spec() for name, m in modules.items()},
            "config": None if config is None else config.to_dict()}  # fmt: skip
    with atomic_dir(path, overwrite=overwrite) as tmp:
        model.config.save_pretrained(str(tmp))
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        write_text(tmp / "svdkit.json", json.dumps(meta, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if report is not None:
            write_text(tmp / "report.md", report if isinstance(report, str) else report.to_markdown())
        if dense:
            save_dense(model, tmp / "dense", tokenizer=tokenizer)
    return Path(path)


def is_compressed(path: str | os.PathLike) -> bool:
    """True for a folder written by :func:`save_compressed`."""
    meta = Path(path) / "svdkit.json"
    try:
        return meta.is_file() and json.loads(meta.read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def load_compressed(path: str | os.PathLike, *, dtype: torch.dtype | None = None, device="cpu") -> nn.Module:
    """The compressed model saved at ``path`` (eval mode). It is rebuilt from config.json with its parameters
    on the meta device (``accelerate.init_empty_weights``), the factored modules are put in place and the
    saved tensors are assigned: the dense weights of compressed linears never exist in memory."""
    import transformers as tf
    from safetensors.torch import load_file

    path = Path(path)
    if not is_compressed(path):
        raise ValueError(f"{path} is not an svdkit compressed model (no svdkit.json with format {FORMAT!r}); save "
                         "one with svdkit.save_compressed, or load plain Hugging Face folders with svdkit.load_model.")  # fmt: skip
    meta = json.loads((path / "svdkit.json").read_text())
    if meta["version"] > FORMAT_VERSION:
        raise ValueError(f"{path} was written by a newer svdkit (format {meta['version']}); upgrade svdkit.")
    cls = getattr(tf, meta["architecture"], None)
    if cls is None:
        raise ValueError(f"{path}: this transformers has no class {meta['architecture']}; upgrade transformers.")
    hf_config = tf.AutoConfig.from_pretrained(str(path), local_files_only=True)
    saved_dtype = getattr(torch, meta.get("dtype", "float32"))
    try:
        from accelerate import init_empty_weights

        with init_empty_weights(include_buffers=False):
            model = cls(hf_config)
    except ImportError:  # without accelerate the dense weights are built once (random init), then replaced
        model = cls(hf_config)
    for name, spec in meta["modules"].items():
        kind = spec.get("type", "low-rank")  # files written before the type was recorded hold LowRankLinear
        if kind not in TYPES:
            raise ValueError(f"{path}: module {name} has type {kind!r}, unknown to this svdkit ({', '.join(TYPES)}); "
                             "upgrade svdkit.")  # fmt: skip
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, TYPES[kind].from_spec(spec, saved_dtype, "meta"))
    state = load_file(str(path / WEIGHTS))
    indexed = [f"{n}.index" for n, spec in meta["modules"].items() if spec.get("type", "low-rank") != "low-rank"]
    if any(k not in state for k in indexed):
        raise ValueError(f"{path}: {WEIGHTS} lacks the kept-dimension indices {[k for k in indexed if k not in state][:3]}; "
                         "the folder is damaged.")  # fmt: skip
    result = model.load_state_dict(state, strict=False, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    missing = [k for k, p in model.named_parameters() if p.device.type == "meta"]
    if missing or result.unexpected_keys:
        raise ValueError(f"{path}: {WEIGHTS} does not match the saved architecture (missing {missing[:3]}, "
                         f"unexpected {list(result.unexpected_keys)[:3]}); the folder is damaged.")  # fmt: skip
    model.to(device=device, dtype=dtype or saved_dtype)
    if meta.get("config") is not None:
        try:
            model._svdkit_compression = config_from_dict(meta["config"])
        except (ValueError, TypeError) as exc:
            warnings.warn(f"{path}: the recorded compression config does not load ({exc}).", stacklevel=2)
    return model.eval()


def save_dense(model: nn.Module, path: str | os.PathLike, *, tokenizer=None, overwrite: bool = False) -> Path:
    """Plain dense weights (W' = A·B; pruned heads: the kept rows/columns in place, zeros elsewhere) in a Hugging
    Face folder that ``from_pretrained`` loads without svdkit.

    The model is left as it is (the dense copy is made module by module into a copy)."""
    import copy

    dense = copy.deepcopy(model)
    for name, m in _factored(dense).items():
        with torch.no_grad():
            linear = m.dense()
        parent, _, child = name.rpartition(".")
        conv1d = getattr(m, "conv1d", False)
        setattr(dense.get_submodule(parent) if parent else dense, child, _as_conv1d(linear) if conv1d else linear)
    with atomic_dir(path, overwrite=overwrite) as tmp:
        dense.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return Path(path)


def _as_conv1d(linear: nn.Linear) -> nn.Module:
    """GPT-2 stores c_attn/c_fc/c_proj as Conv1D (weight in × out): rebuild that type so its checkpoint loads."""
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(linear.out_features, linear.in_features)
    with torch.no_grad():
        conv.weight.copy_(linear.weight.T)
        conv.bias.copy_(linear.bias if linear.bias is not None else torch.zeros(linear.out_features))
    return conv
