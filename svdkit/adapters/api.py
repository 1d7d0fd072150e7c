"""adapt / unadapt / merge / regularization: swapping target linears for adapted layers, in place."""

from __future__ import annotations

import contextlib
import json
import math
import re
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from svdkit.adapters.config import AdapterConfig
from svdkit.core.distributed import broadcast_init, rank_and_world
from svdkit.core.fingerprint import tensor_fingerprint
from svdkit.adapters.layers import SpectralLinear, output_side, weight_matrix
from svdkit.core.linalg import check_matrix
from svdkit.core.targets import linear_modules, select_targets
from svdkit.core.registry import Refused

# Same-shaped weights are decomposed in one batched call on accelerators (fewer kernel launches), up to
# ~128 MB of fp32. On the CPU LAPACK works matrix by matrix anyway, so layers go one at a time (no copy).
MAX_BATCH_ELEMENTS = 1 << 25


@dataclass
class AdaptState:
    """What svdkit keeps on an adapted model (as ``model._svdkit``)."""

    config: AdapterConfig
    module_configs: dict[str, AdapterConfig] = field(default_factory=dict)
    requires_grad: dict[str, bool] = field(default_factory=dict)  # flags before adapt, restored after


def state(model: nn.Module) -> AdaptState:
    st = getattr(model, "_svdkit", None)
    if st is None:
        raise ValueError("this model is not adapted by svdkit: call svdkit.adapt(model, cfg) or svdkit.load_adapter first.")
    return st


def adapted_layers(model: nn.Module) -> Iterator[tuple[str, SpectralLinear]]:
    for name, module in model.named_modules():
        if isinstance(module, SpectralLinear):
            yield name, module


def _check_not_adapted(model: nn.Module) -> None:
    if getattr(model, "_svdkit", None) is not None or any(True for _ in adapted_layers(model)):
        raise ValueError("this model is already adapted; call svdkit.merge(model) or svdkit.unadapt(model) first.")


def _plan(model: nn.Module, cfg: AdapterConfig) -> list[tuple[str, nn.Module, AdapterConfig]]:
    """Targets with their per-module configs, validated before any work is done."""
    return [_plan_item(name, module, cfg) for name, module in select_targets(model, cfg.targets, cfg.exclude)]


def _plan_item(name: str, module: nn.Module, cfg: AdapterConfig) -> tuple[str, nn.Module, AdapterConfig]:
    mcfg = cfg.for_module(name)
    W = weight_matrix(module)
    if not torch.is_floating_point(W):
        check_matrix(W, name)  # raises, naming the module
    m, n = W.shape
    if mcfg.uses_rank and mcfg.rank >= min(m, n):
        raise Refused(
            f"rank {mcfg.rank} is too large for {name} (weight {m}×{n}): it must be < min(out, in) = "
            f"{min(m, n)}. Lower the rank, exclude the module, or set overrides={{{name.rsplit('.', 1)[-1]!r}: "
            f"{{'rank': {min(m, n) // 2}}}}}."
        )
    return name, module, mcfg


class Group(list):
    """Plan items that ``cfg.initialize_group`` initializes together (one Init per item)."""


def _chunks(model: nn.Module, cfg: AdapterConfig, plan: list) -> list:
    """The method's groups (``cfg.groups``; they may bring in linears that are not targets), then batches of
    the other targets. Every rank computes the same list (names only), so chunk i belongs to rank i % world."""
    linears = {n: m for n, m in linear_modules(model) if not (cfg.exclude and re.search(cfg.exclude, n))}
    planned = {item[0]: item for item in plan}
    groups, seen = [], set()
    for names in cfg.groups(list(planned), linears):
        for name in names:
            if name not in linears or name in seen:
                why = "in two groups" if name in seen else "not a linear module of this model (or excluded)"
                raise ValueError(f"{type(cfg).__name__}.groups returned {name!r}, which is {why}.")
            seen.add(name)
        groups.append(Group(planned.get(n) or _plan_item(n, linears[n], cfg) for n in names))
    return groups + list(_batches([item for item in plan if item[0] not in seen]))


def _initialize(cfg: AdapterConfig, chunk: list, calibration) -> list:
    """The Inits of one chunk: one batched Init for a batch, one Init (b = 1) per module for a Group."""
    names = [name for name, _, _ in chunk]
    mats = [weight_matrix(module).detach() for _, module, _ in chunk]
    if not isinstance(chunk, Group):
        weights = mats[0].unsqueeze(0) if len(mats) == 1 else torch.stack(mats)  # CPU: a view, no copy
        _check_finite(weights, names)
        return [chunk[0][2].initialize(weights, names, calibration)]
    for name, W in zip(names, mats):
        _check_finite(W.unsqueeze(0), [name])
    inits = list(cfg.initialize_group(mats, names, calibration))
    if len(inits) != len(chunk):
        raise ValueError(f"{type(cfg).__name__}.initialize_group returned {len(inits)} Inits for the {len(chunk)} modules {names}.")
    return inits


def _batches(plan):
    """Chunks of same-shaped, same-config modules (so one batched SVD call serves them all)."""
    groups: dict[tuple, list] = {}
    for item in plan:
        name, module, mcfg = item
        W = weight_matrix(module)
        key = (json.dumps(mcfg.to_dict(), sort_keys=True), tuple(W.shape), W.dtype, W.device)
        groups.setdefault(key, []).append(item)
    for (_, _, _, device), items in groups.items():
        alone = device.type == "cpu" or not items[0][2].batched
        per = 1 if alone else max(1, MAX_BATCH_ELEMENTS // weight_matrix(items[0][1]).numel())
        for start in range(0, len(items), per):
            yield items[start : start + per]


def _check_finite(weights: torch.Tensor, names: list[str]) -> None:
    """One reduction per matrix; NaN/Inf anywhere makes its sum non-finite (then check_matrix names the
    layer, or finds only an overflow of the sum and passes). No temporaries of the weight's size."""
    sums = weights.sum(dim=(-2, -1))
    for name, total, W in zip(names, sums.tolist(), weights):
        if not math.isfinite(total):
            check_matrix(W, name)


def _progress(total: int, desc: str, enabled: bool | None):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="layer", disable=(None if enabled is None else not enabled))


def adapt(
    model: nn.Module, cfg: AdapterConfig, calibration=None, *, progress: bool | None = None
) -> nn.Module:
    """Swap every target linear of ``model`` for a :class:`SpectralLinear` initialized by ``cfg``.

    All targets are validated and initialized before the first swap, so an error leaves the model
    untouched. Every non-adapter parameter is frozen (flags are restored by ``unadapt``/``merge``).
    ``progress``: None shows a bar on a terminal only. Under an initialized process group (torchrun),
    each rank decomposes its share of the layers and the factors are broadcast to all ranks.
    Data-aware methods (``cfg.uses_calibration``) need ``calibration=svdkit.calibrate(model, batches, cfg)``.
    """
    if not isinstance(cfg, AdapterConfig):
        raise TypeError(f"expected a method config such as svdkit.PiSSA(rank=16), got {type(cfg).__name__}.")
    _check_not_adapted(model)
    cfg = cfg.for_model(getattr(model, "config", None))  # architecture-dependent options (CLOVER's head size)
    cfg = _with_calibration(model, cfg, calibration)
    plan = _plan(model, cfg)
    chunks = _chunks(model, cfg, plan)
    rank, world = rank_and_world()
    inits: list = [None] * len(chunks)  # per chunk: [batched Init], or one Init per module of a Group
    total = sum(len(chunk) for chunk in chunks)
    with torch.no_grad(), _progress(total, f"svdkit {cfg.name} init", False if rank else progress) as bar:
        for i, chunk in enumerate(chunks):  # under torchrun each rank decomposes every world-th chunk
            if i % world == rank:
                inits[i] = _initialize(cfg, chunk, calibration)
            bar.update(len(chunk))
        if world > 1:
            device = weight_matrix(plan[0][1]).device
            count = lambda chunk: len(chunk) if isinstance(chunk, Group) else 1  # noqa: E731
            inits = [[broadcast_init(init, i % world, device) for init in (inits[i] or [None] * count(chunk))]
                     for i, chunk in enumerate(chunks)]  # fmt: skip
    layers: dict[str, SpectralLinear] = {}
    for chunk, got in zip(chunks, inits):
        for i, (name, module, mcfg) in enumerate(chunk):
            init, j = (got[i], 0) if isinstance(chunk, Group) else (got[0], i)
            layers[name] = build_layer(module, mcfg, init, j)
    install(model, cfg, layers)
    return model


def _with_calibration(model: nn.Module, cfg: AdapterConfig, calibration) -> AdapterConfig:
    """Check that ``calibration`` fits the method, model and targets; the config the method resolves from it."""
    name = type(cfg).__name__
    if not cfg.uses_calibration:
        if calibration is not None:
            raise ValueError(f"{name} does not use calibration statistics; drop the calibration argument.")
        return cfg
    if calibration is None:
        raise ValueError(
            f"{name} chooses its subspace from data: compute statistics first with "
            f"stats = svdkit.calibrate(model, batches, cfg), then svdkit.adapt(model, cfg, calibration=stats) "
            f"(CLI: svdkit finetune --method {cfg.name} --calibration-data NAME|FILE)."
        )
    from svdkit.core.calibration import Calibration

    if not isinstance(calibration, Calibration):
        raise TypeError(f"calibration must be the svdkit.Calibration returned by svdkit.calibrate, got {type(calibration).__name__}.")
    targets = list(select_targets(model, cfg.targets, cfg.exclude))
    calibration.check(cfg, targets)
    return cfg.resolve(calibration, {n: tuple(weight_matrix(m).shape) for n, m in targets})


def build_layer(module: nn.Module, mcfg: AdapterConfig, init, i: int) -> SpectralLinear:
    """The adapted layer for item ``i`` of a batched :class:`~svdkit.adapters.layers.Init`."""
    t = init.layer(i)
    core = mcfg.make_core(t["core"]) if t["core"] else None
    A0, B0 = t["A0"], t["B0"]
    if init.subtract:  # frozen copies of the initial update's factors: B₀ = B·C(init), A₀ = A
        with torch.no_grad():
            A0 = t["A"]
            B0 = output_side(t["B"], core() if core is not None else None)
    return SpectralLinear(
        module, t["A"], t["B"], mode=init.mode, A0=A0, B0=B0, core=core, bias=init.bias,
        scaling=mcfg.scaling, trainable=init.trainable, fold=mcfg.fold, dropout=mcfg.dropout,
        fingerprint=tensor_fingerprint(weight_matrix(module)),
    )  # fmt: skip


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def install(model: nn.Module, cfg: AdapterConfig, layers: dict[str, SpectralLinear]) -> None:
    """Put adapted layers in place, freeze everything else, and record the state (adapt and load)."""
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    for name, layer in layers.items():
        layer.fold_base()
        layer.train(model.get_submodule(name).training)  # the mode of the module it replaces (eval: no dropout)
        _replace(model, name, layer)
    for name, param in model.named_parameters():
        param.requires_grad_(False)
    for layer in layers.values():
        for _, param in layer.adapter_parameters():
            param.requires_grad_(True)
    model._svdkit = AdaptState(cfg, {name: cfg.for_module(name) for name in layers}, flags)


def _leave(model: nn.Module, how: str) -> nn.Module:
    st = state(model)
    for name, layer in list(adapted_layers(model)):
        _replace(model, name, (layer.merged() if how == "merge" else layer.restored()).train(layer.training))
    for name, param in model.named_parameters():
        param.requires_grad_(st.requires_grad.get(name, param.requires_grad))
    del model._svdkit
    return model


def unadapt(model: nn.Module) -> nn.Module:
    """Remove every adapter and put the original modules back (weights bit-exact unless ``fold``)."""
    return _leave(model, "unadapt")


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its module's weight; the model then has only plain linears.

    W' = W + s·(B A − B₀ A₀), computed in the adapter dtype and stored in the weight's dtype.
    """
    with torch.no_grad():
        return _leave(model, "merge")


def _layers_by_config(model: nn.Module):
    """Groups of adapted layers that share one (per-module) config: {config_json: (config, {name: layer})}."""
    st = state(model)
    groups: dict[str, tuple] = {}
    for name, layer in adapted_layers(model):
        mcfg = st.module_configs[name]
        groups.setdefault(json.dumps(mcfg.to_dict(), sort_keys=True), (mcfg, {}))[1][name] = layer
    return groups.values()


def after_clipping(model: nn.Module, peak_lr: float) -> None:
    """Run the methods' gradient hooks (after clipping, before the optimizer step)."""
    for mcfg, layers in _layers_by_config(model):
        mcfg.after_clipping(layers, peak_lr)


def after_step(model: nn.Module, step: int, total_steps: int) -> None:
    """Run the methods' training-time schedules (after each optimizer step)."""
    for mcfg, layers in _layers_by_config(model):
        mcfg.after_step(layers, step, total_steps)


def after_task(model: nn.Module) -> None:
    """Run the methods' end-of-task hooks (between the tasks of a continual sequence)."""
    for mcfg, layers in _layers_by_config(model):
        mcfg.after_task(layers)


def training_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The methods' training-time state of every adapted layer (AdaLoRA's sensitivity EMAs and masks,
    VectorFit's frozen vectors), as ``{"<module>.<key>": tensor}`` on the CPU: what a checkpoint saves
    besides the adapter and the optimizer so that a resumed run continues exactly. Empty for stateless methods."""
    state(model)
    return {f"{name}.{key}": value.detach().cpu() for name, layer in adapted_layers(model)
            for key, value in layer.method_state.tensors().items()}  # fmt: skip


def load_training_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Restore what :func:`training_state` returned (onto the layers' devices); every layer's previous state
    is replaced. Keys naming no adapted layer are an error (a checkpoint of another model or method)."""
    state(model)
    layers = dict(adapted_layers(model))
    mine: dict[str, dict] = {name: {} for name in layers}
    for full, value in tensors.items():
        name, _, key = full.rpartition(".")
        if name not in mine or not key:
            raise ValueError(f"training state entry {full!r} names no adapted layer of this model; the checkpoint "
                             "belongs to another model or method.")  # fmt: skip
        mine[name][key] = value
    for name, layer in layers.items():
        layer.method_state.clear()
        device = next(t.device for t in (*layer.parameters(), *layer.buffers()))
        for key, value in mine[name].items():
            layer.method_state.set(key, value.to(device))


def regularization(model: nn.Module) -> torch.Tensor:
    """Sum of the methods' regularizers over all adapted layers (a zero tensor if there are none). A method
    whose ``regularizer_mean`` is True (AdaLoRA) contributes the mean of its per-layer terms over the layers
    sharing its config instead of their sum."""
    total = None
    for mcfg, layers in _layers_by_config(model):
        mean = mcfg.regularizer_mean
        for layer in layers.values():
            term = mcfg.regularizer(layer)
            if term is not None:
                term = term / len(layers) if mean else term
                total = term if total is None else total + term
    if total is None:
        param = next(model.parameters(), None)
        total = torch.zeros((), device=param.device if param is not None else None)
    return total


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Within the block every adapted layer computes the function of the module it was adapted from,
    W x + b, so ``model`` is the original model (bit-exact unless ``fold=True``: then W = W_res + s·B₀A₀ is
    rebuilt, equal to rounding). Gradients do not reach the adapters through such a forward."""
    layers = [layer for _, layer in adapted_layers(model)]
    if not layers:
        raise ValueError("adapters_disabled: this model has no svdkit adapters (call svdkit.adapt first).")
    previous = [layer.adapter_disabled for layer in layers]
    for layer in layers:
        layer.adapter_disabled = True
    try:
        yield model
    finally:
        for layer, flag in zip(layers, previous):
            layer.adapter_disabled = flag


def uses_outputs(model: nn.Module) -> bool:
    """Whether the adapted model's method adds a loss on its outputs (see :func:`output_regularization`)."""
    st = getattr(model, "_svdkit", None)
    return st is not None and st.config.uses_outputs


def base_outputs(model: nn.Module, batch: dict, forward=None) -> torch.Tensor:
    """``forward(model, batch)`` of the original model: adapters disabled, no grad, eval mode (no dropout;
    every module's mode is restored afterwards). ``forward`` defaults to the logits at the labelled positions
    (:func:`svdkit.training.batches.labelled_logits`), the outputs svdkit's training loop scores."""
    if forward is None:
        from svdkit.training.batches import labelled_logits

        forward = lambda m, b: labelled_logits(m, b)[0]  # noqa: E731
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad(), adapters_disabled(model):
            return forward(model, batch)
    finally:
        for module, mode in modes:
            module.training = mode


def output_regularization(model: nn.Module, batch: dict, outputs: torch.Tensor, forward=None) -> torch.Tensor:
    """The method's output-space regularizer (BA-LoRA) for ``outputs``, the model's outputs on ``batch``
    (a zero tensor, at no cost, for methods without one).

    ``outputs`` must be what ``forward(model, batch)`` returns (default: the logits at the labelled positions,
    ``svdkit.training.batches.labelled_logits(model, batch)[0]``); where the method needs the frozen original model's
    outputs they are computed with :func:`base_outputs` (one extra forward without grad).
    """
    cfg = state(model).config
    term = None
    if cfg.uses_outputs:
        base = base_outputs(model, batch, forward) if cfg.needs_base_outputs else None
        term = cfg.output_regularizer(outputs, base)
    return outputs.new_zeros(()) if term is None else term
