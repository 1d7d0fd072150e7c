"""Layer-by-layer calibration + compression (SVD-LLM's low-resource mode): memory of one block's statistics.

The inputs of the first transformer block are captured for every calibration batch (one forward pass that
stops there), then each block in turn: its targets' input statistics are accumulated while the block runs
on the captured hidden states, its targets are compressed, the statistics are dropped, and the block's
outputs become the next block's inputs. Only one block's covariances (one per distinct input: q/k/v and
gate/up share theirs) live at a time, plus the calibration hidden states (tokens × hidden per stream).

Inputs: by default the original model's (each block runs before it is compressed), so the result equals
``compress(model, cfg, calibration=svdkit.calibrate(model, batches, cfg))``. With SVD-LLM's ``update=True``
a second stream carries the compressed model's hidden states, and each target's left factor is re-solved
against the original outputs (see :func:`svdkit.core.covariance.least_squares_left`): X_c is the target's
input when the preceding blocks are compressed and its own block is not yet (a choice: the paper's code
does not specify the order inside a block).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from svdkit.adapters.layers import weight_matrix
from svdkit.compression.engine import ModuleRow, compress_module, spectrum


class _Stop(Exception):
    """Raised by the hook that ends the capture pass before the first block runs."""


def in_blocks(model: nn.Module, targets) -> bool:
    """Can every target be calibrated layer by layer (is it inside an element of an nn.ModuleList)?"""
    try:
        blocks_of(model, targets)
    except ValueError:
        return False
    return True


def blocks_of(model: nn.Module, targets: list[tuple[str, nn.Module]]) -> list[tuple[nn.Module, list[tuple[str, nn.Module]]]]:
    """(block, its targets) in model order: a block is an element of the outermost ``nn.ModuleList`` above a target."""
    lists = {name for name, m in model.named_modules() if isinstance(m, nn.ModuleList)}
    groups: dict[str, list] = {}
    for name, module in targets:
        parts = name.split(".")
        prefix = next((".".join(parts[: i + 1]) for i in range(1, len(parts) - 1) if ".".join(parts[:i]) in lists), None)
        if prefix is None:
            raise ValueError(f"{name} is not inside a block of an nn.ModuleList, so it cannot be calibrated layer by "
                             "layer; compute the statistics first (stats = svdkit.calibrate(model, batches, cfg)) and "
                             "pass compress(model, cfg, calibration=stats), or exclude it.")  # fmt: skip
        groups.setdefault(prefix, []).append((name, module))
    return [(model.get_submodule(p), members) for p, members in groups.items()]


def _capture(model: nn.Module, first: nn.Module, batches: list[dict]) -> list[tuple[Tensor, tuple, dict]]:
    """(hidden, other args, kwargs) of the first block's call, per batch."""
    seen: list = []

    def hook(module, args, kwargs):
        if args:
            seen.append((args[0], (None, *args[1:]), dict(kwargs)))
        else:
            kw = dict(kwargs)
            seen.append((kw.pop("hidden_states"), (), kw))
        raise _Stop

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in batches:
                inputs = {k: v for k, v in batch.items() if k != "labels"}
                try:
                    model(**inputs, use_cache=False) if _takes_cache(model) else model(**inputs)
                except _Stop:
                    pass
    finally:
        handle.remove()
    return seen


def _takes_cache(model) -> bool:
    return getattr(getattr(model, "config", None), "use_cache", None) is not None


def _run(block: nn.Module, hidden: Tensor, args: tuple, kwargs: dict) -> Tensor:
    out = block(hidden, *args[1:], **kwargs) if args else block(hidden_states=hidden, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


class _Inputs:
    """Pre-hooks on a block's targets that hand each distinct input (rows of real tokens) to ``sink``."""

    def __init__(self, members, sink):
        self.owner: dict[str, str] = {}  # target → the target whose input it shares
        self.last: tuple[str, Tensor] | None = None
        self.mask: Tensor | None = None
        self.handles = [module.register_forward_pre_hook(self._hook(name, sink)) for name, module in members]

    def _hook(self, name, sink):
        def hook(module, args):
            x = args[0]
            if self.last is not None and x is self.last[1]:
                self.owner.setdefault(name, self.owner.get(self.last[0], self.last[0]))
                return
            self.last = (name, x)
            self.owner.setdefault(name, name)
            if self.mask is not None and x.shape[:-1] == self.mask.shape:
                rows, counts = x[self.mask].float(), self.mask.sum(dim=1)
            else:
                rows = x.reshape(-1, x.shape[-1]).float()
                counts = torch.tensor([rows.shape[0]])
            sink(name, module, rows, counts)

        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def layerwise(model, cfg, targets, batches: list[dict], ranks: dict | None, progress) -> tuple[list[ModuleRow], dict, int, int]:
    """Compress ``targets`` block by block (``ranks`` None: only measure spectra, return them instead).

    Returns (rows, spectra, peak statistics bytes held at once, their sum over the blocks: what holding every
    block's statistics together would take).
    """
    from tqdm.auto import tqdm

    update = bool(getattr(cfg, "update", False)) and ranks is not None
    stat = cfg.statistic()
    blocks = blocks_of(model, targets)
    captured = _capture(model, blocks[0][0], batches)
    masks = [b.get("attention_mask") for b in batches]
    masks = [None if m is None else m.bool() for m in masks]
    hidden_o = [h for h, _, _ in captured]
    hidden_c = list(hidden_o) if update else None
    rows: list[ModuleRow] = []
    spectra: dict[str, Tensor] = {}
    peak = total = 0
    desc = "svdkit compress (layer by layer)" if ranks is not None else "svdkit spectra (layer by layer)"
    for block, members in tqdm(blocks, desc=desc, unit="block", disable=progress is False):
        states: dict[str, dict] = {}
        captured_x: dict[str, Tensor] = {}
        cross: dict[str, list[Tensor]] = {}

        def measure(name, module, x, counts):
            if name not in states:
                m, n = weight_matrix(module).shape
                states[name] = stat.start(n, m, x.device)
            stat.update(states[name], x, counts)
            if update:
                captured_x[name] = x

        def pair(name, module, x, counts):
            xo = captured_x.pop(name).double()
            xc = x.double()
            if name not in cross:
                cross[name] = [torch.zeros(xo.shape[1], xo.shape[1], dtype=torch.float64) for _ in range(2)]
            cross[name][0] += xo.T @ xc
            cross[name][1] += xc.T @ xc

        hooks = _Inputs(members, measure)
        next_o = []
        try:
            with torch.no_grad():
                for i, (_, args, kwargs) in enumerate(captured):
                    hooks.mask, hooks.last = masks[i], None
                    next_o.append(_run(block, hidden_o[i], args, kwargs))
                    if update:
                        pair_hooks = _Inputs(members, pair)
                        pair_hooks.mask = masks[i]
                        try:
                            _run(block, hidden_c[i], args, kwargs)
                        finally:
                            pair_hooks.close()
        finally:
            hooks.close()
        held = sum(t.numel() * t.element_size() for s in states.values() for t in s.values())
        held += sum(t.numel() * t.element_size() for c in cross.values() for t in c)
        peak, total = max(peak, held), total + held
        finished = {name: stat.finish(s) for name, s in states.items()}
        for name, module in members:
            stats = finished[hooks.owner[name]]
            if ranks is None:
                spectra[name] = spectrum(cfg, name, module, stats)
                continue
            upd = tuple(cross[hooks.owner[name]]) if update else None
            rows.append(compress_module(model, cfg, name, module, ranks[name], stats, stats["covariance"], upd))
        del states, finished, cross
        hidden_o = next_o
        if update:
            with torch.no_grad():
                hidden_c = [_run(block, hidden_c[i], args, kw) for i, (_, args, kw) in enumerate(captured)]
    return rows, spectra, peak, total
