"""``svdkit.calibrate``: the explicit data pass of data-aware methods (CorDA, EVA, LoRA-One, LoRA-GA, …).

    stats = svdkit.calibrate(model, batches, cfg)          # forward (and, for gradients, backward) hooks
    stats.save("calib.safetensors")                        # plain tensors keyed by module name
    svdkit.adapt(model, cfg, calibration=stats)            # checks the statistics fit this model and targets

What is measured is the method's :class:`Statistic` (``cfg.statistic()``): streaming sums in fp32/fp64, never
all activations. Layers that read the same input tensor (q/k/v, gate/up) are measured once. Under an
initialized process group the statistics are reduced over ranks (each rank passes its own batches).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable

import torch
from torch import Tensor, nn

from svdkit.core.distributed import rank_and_world
from svdkit.core.fingerprint import compare, tensor_fingerprint
from svdkit.adapters.layers import weight_matrix
from svdkit.core.targets import is_conv1d, select_targets

FORMAT = "svdkit-calibration"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Statistic:
    """What a data-aware method measures for each target module (its fields are its options).

    ``kind`` names it; ``needs_grad`` runs backward and feeds ``update`` the weight's gradient (m × n);
    ``tokens`` picks the positions fed to forward statistics: ``"attention"`` (non-padding) or ``"labels"``
    (label ≠ -100); ``reduce`` is ``"sum"`` (states are sums, all-reduced at the end) or ``"gather"`` (under
    DDP every batch's rows are gathered first, for sequential algorithms).
    """

    kind: ClassVar[str] = ""
    needs_grad: ClassVar[bool] = False
    tokens: ClassVar[str] = "attention"
    reduce: ClassVar[str] = "sum"

    def start(self, n_in: int, m_out: int, device: torch.device) -> dict[str, Tensor]:
        raise NotImplementedError

    def update(self, state: dict[str, Tensor], x: Tensor, counts: Tensor) -> None:
        """Forward: ``x`` (N × n, fp32) rows of the selected positions, each sequence's rows contiguous,
        ``counts`` (B,) rows per sequence. Gradient: ``x`` = ∂L/∂W (m × n, fp32), ``counts`` = tokens."""
        raise NotImplementedError

    def converged(self, state: dict[str, Tensor]) -> bool:
        return False

    def finish(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """The kind and options, JSON-normalized (what a saved calibration is compared by)."""
        return json.loads(json.dumps({"kind": self.kind, **dataclasses.asdict(self)}))


class Calibration:
    """Per-module statistics: ``stats[module_name] -> {name: tensor}``, plus where they came from."""

    def __init__(self, statistic: dict, tensors: dict[str, dict[str, Tensor]], *, aliases: dict[str, str],
                 fingerprints: dict[str, str], samples: int, tokens: int, batches: int):  # fmt: skip
        self.statistic, self.tensors, self.aliases = statistic, tensors, aliases
        self.fingerprints, self.samples, self.tokens, self.batches = fingerprints, samples, tokens, batches

    @property
    def names(self) -> list[str]:
        return sorted(self.fingerprints)

    def __contains__(self, name: str) -> bool:
        return name in self.fingerprints

    def __getitem__(self, name: str) -> dict[str, Tensor]:
        if name not in self.fingerprints:
            raise KeyError(f"no calibration statistics for module {name!r}; they cover {len(self.names)} modules "
                           f"(e.g. {self.names[:3]}). Recompute them with the same targets.")  # fmt: skip
        return self.tensors[self.aliases.get(name, name)]

    def __repr__(self) -> str:
        return (f"Calibration({self.statistic.get('kind')!r}, {len(self.fingerprints)} modules, "
                f"{self.samples} samples, {self.tokens} tokens)")  # fmt: skip

    # -- files -------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """One safetensors file (tensors ``"<module>::<name>"``, the rest as JSON metadata), written atomically."""
        from safetensors.torch import save_file

        path = Path(path)
        flat = {f"{module}::{key}": t.detach().cpu().contiguous() for module, d in self.tensors.items() for key, t in d.items()}
        meta = {"format": FORMAT, "version": FORMAT_VERSION, "statistic": self.statistic, "aliases": self.aliases,
                "fingerprints": self.fingerprints, "samples": self.samples, "tokens": self.tokens, "batches": self.batches}  # fmt: skip
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            save_file(flat, str(tmp), metadata={"svdkit": json.dumps(meta)})
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Calibration":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no calibration file at {path}; compute one with svdkit.calibrate(...).save(path).")
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("svdkit")
            meta = json.loads(raw) if raw else {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path} is not an svdkit calibration file (no svdkit calibration metadata).")
            if meta["version"] > FORMAT_VERSION:
                raise ValueError(f"{path} was written by a newer svdkit (format {meta['version']}); upgrade svdkit.")
            tensors: dict[str, dict[str, Tensor]] = {}
            for key in f.keys():
                module, name = key.split("::", 1)
                tensors.setdefault(module, {})[name] = f.get_tensor(key)
        return cls(meta["statistic"], tensors, aliases=meta["aliases"], fingerprints=meta["fingerprints"],
                   samples=meta["samples"], tokens=meta["tokens"], batches=meta["batches"])  # fmt: skip

    # -- fit check ---------------------------------------------------------------------------------
    def check(self, cfg, targets: list[tuple[str, nn.Module]]) -> None:
        """Raise if these statistics were made by another statistic, for other targets or another model."""
        want = cfg.statistic().describe()
        if self.statistic != want:
            raise ValueError(f"these statistics were computed as {self.statistic}, but {type(cfg).__name__} needs "
                             f"{want}; recompute them with svdkit.calibrate(model, batches, cfg).")  # fmt: skip
        missing = [name for name, _ in targets if name not in self.fingerprints]
        if missing:
            raise ValueError(f"the statistics do not cover {len(missing)} target module(s) (e.g. {missing[:3]}): they "
                             "were computed for different targets; recompute them with this config's targets.")  # fmt: skip
        for name, module in targets:
            if compare(weight_matrix(module), self.fingerprints[name]) == "different":  # another dtype is fine
                raise ValueError(f"the statistics for {name} were computed on different weights (fingerprint "
                                 "mismatch): they belong to another model; recompute them on this one.")  # fmt: skip


def calibrate(
    model: nn.Module, batches: Iterable[dict], cfg, *, max_batches: int | None = None, offload: bool = False,
    loss: Callable[[nn.Module, dict], Tensor] | None = None, progress: bool | None = None,
) -> Calibration:
    """Measure ``cfg.statistic()`` on every target module of ``model`` over ``batches``.

    ``batches``: dicts the model takes as keyword arguments (``input_ids``, ``attention_mask``, ``labels``);
    gradient statistics differentiate ``loss(model, batch)`` (default: the model's own ``.loss``, which needs
    ``labels``). ``max_batches`` bounds the pass. ``offload`` keeps the running sums on the CPU (for gradient
    statistics of large models on a GPU). ``progress``: None shows a bar on a terminal only. The model is
    left exactly as it was (modes, ``requires_grad`` flags, no hooks). Under torchrun every rank must pass
    the same number of batches (the statistics are reduced over ranks).
    """
    if not getattr(cfg, "uses_calibration", False):
        raise ValueError(f"{type(cfg).__name__} does not use calibration data; call svdkit.adapt(model, cfg) directly.")
    if getattr(model, "_svdkit", None) is not None:
        raise ValueError("calibrate the original model, before svdkit.adapt (this one is already adapted).")
    stat = cfg.statistic()
    targets = list(select_targets(model, cfg.targets, cfg.exclude))
    device = next(model.parameters()).device
    where = torch.device("cpu") if offload else device
    pass_ = _GradientPass if stat.needs_grad else _ForwardPass
    run = pass_(model, targets, stat, where)
    run.loss_fn = loss or _model_loss
    was_training = model.training
    model.eval()
    try:
        total = max_batches if max_batches is not None else (len(batches) if hasattr(batches, "__len__") else None)
        with _progress(total, progress) as bar:
            for i, batch in enumerate(batches):
                if max_batches is not None and i >= max_batches:
                    break
                run.batch({k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()})
                bar.update(1)
                if run.all_converged():
                    break
    finally:
        run.close()
        model.train(was_training)
    return run.result()


def _progress(total: int | None, enabled: bool | None):
    from tqdm.auto import tqdm

    rank = rank_and_world()[0]
    return tqdm(total=total, desc="svdkit calibrate", unit="batch", disable=True if rank else (None if enabled is None else not enabled))


class _Pass:
    """Shared bookkeeping of a calibration pass: states per measured module, counts, the result."""

    def __init__(self, model, targets, stat: Statistic, where: torch.device):
        self.model, self.targets, self.stat, self.where = model, targets, stat, where
        self.states: dict[str, dict[str, Tensor]] = {}
        self.aliases: dict[str, str] = {}
        self.done: set[str] = set()
        self.batches = self.samples = self.tokens = 0
        self.handles: list = []

    def state_for(self, name: str, module: nn.Module) -> dict[str, Tensor]:
        if name not in self.states:
            m, n = weight_matrix(module).shape
            self.states[name] = self.stat.start(n, m, self.where)
        return self.states[name]

    def all_converged(self) -> bool:
        return bool(self.states) and len(self.done) == len(self.states)

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def result(self) -> Calibration:
        rank, world = rank_and_world()
        counts = torch.tensor([self.batches, self.samples, self.tokens], dtype=torch.float64)
        if world > 1:
            torch.distributed.all_reduce(counts)
            if self.stat.reduce == "sum":
                for state in self.states.values():
                    for t in state.values():
                        if torch.is_floating_point(t) or t.dtype in (torch.int64, torch.int32):
                            torch.distributed.all_reduce(t)
        batches, samples, tokens = (int(c) for c in counts.tolist())
        if batches == 0:
            raise ValueError("the calibration data is empty: pass at least one batch (a dict with input_ids).")
        if tokens == 0:
            which = "labelled" if self.stat.tokens == "labels" else "non-padding"
            raise ValueError(f"the calibration data has no {which} tokens: every position is masked; check the "
                             "labels/attention_mask of the batches.")  # fmt: skip
        measured = set(self.states) | set(self.aliases)
        unreached = [name for name, _ in self.targets if name not in measured]
        if unreached:
            what = "gradient" if self.stat.needs_grad else "input"
            raise ValueError(f"{len(unreached)} target module(s) got no {what} from the calibration batches (e.g. "
                             f"{unreached[:3]}): the model does not use them on this data; exclude them from the "
                             "targets (exclude=...).")  # fmt: skip
        tensors = {name: {k: v.cpu() for k, v in self.stat.finish(state).items()} for name, state in self.states.items()}
        prints = {name: tensor_fingerprint(weight_matrix(module)) for name, module in self.targets}
        return Calibration(self.stat.describe(), tensors, aliases=self.aliases, fingerprints=prints,
                           samples=samples, tokens=tokens, batches=batches)  # fmt: skip


class _ForwardPass(_Pass):
    """Forward pre-hooks on the targets; a module whose input is the same tensor as an earlier one's
    (q/k/v) is an alias of it and measured once."""

    def __init__(self, model, targets, stat, where):
        super().__init__(model, targets, stat, where)
        self.last: tuple[str, Tensor] | None = None  # the previous target's (name, input)
        for name, module in targets:
            self.handles.append(module.register_forward_pre_hook(self._hook(name)))

    def _positions(self, batch: dict) -> Tensor:
        ids = batch.get("input_ids")
        if ids is None:
            raise ValueError("calibration batches must contain input_ids (dicts the model takes as kwargs).")
        if self.stat.tokens == "labels":
            if batch.get("labels") is None:
                raise ValueError(f"{type(self.stat).__name__} measures labelled tokens only: the batches need 'labels' "
                                 "(or use the statistic's option to measure every non-padding token).")  # fmt: skip
            return batch["labels"] != -100
        mask = batch.get("attention_mask")
        return torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()

    def batch(self, batch: dict) -> None:
        self.mask = self._positions(batch)
        with torch.no_grad():
            self.model(**{k: v for k, v in batch.items() if k != "labels"})
        self.last = None
        self.batches += 1
        self.samples += int(self.mask.any(dim=1).sum())
        self.tokens += int(self.mask.sum())

    def _hook(self, name: str):
        def hook(module, args):
            x = args[0]
            last = self.last  # held alive, so the same address means the same tensor (no reuse)
            if last is not None and (x is last[1] or _same_tensor(x, last[1])):
                self.aliases.setdefault(name, self.aliases.get(last[0], last[0]))
                return
            self.last = (name, x)
            if name in self.aliases or name in self.done:
                return
            rows, counts = self._rows(x)
            state = self.state_for(name, module)
            self.stat.update(state, rows, counts)
            if self.stat.converged(state):
                self.done.add(name)

        return hook

    def _rows(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mask = self.mask
        if x.shape[:-1] != mask.shape:  # not (batch, seq, features): every row counts
            flat = x.reshape(-1, x.shape[-1])
            return self._gather(flat.float(), torch.tensor([flat.shape[0]]))
        return self._gather(x[mask].float(), mask.sum(dim=1))

    def _gather(self, rows: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
        rank, world = rank_and_world()
        if world == 1 or self.stat.reduce != "gather":
            return rows, counts
        return _all_gather_rows(rows), _all_gather_rows(counts.unsqueeze(1).to(rows.dtype)).squeeze(1).long()


class _GradientPass(_Pass):
    """Backward over each batch with only the target weights trainable; each weight's gradient is folded
    into the running statistic as soon as it is accumulated and then freed (one gradient alive at a time)."""

    def __init__(self, model, targets, stat, where):
        super().__init__(model, targets, stat, where)
        self.flags = {p: p.requires_grad for p in model.parameters()}
        self.grads = {p: p.grad for p in model.parameters()}  # the user's gradients: put back by close()
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None  # so the statistic sees this pass's gradients only
        for name, module in targets:
            module.weight.requires_grad_(True)
            self.handles.append(module.weight.register_post_accumulate_grad_hook(self._hook(name, module)))

    def _hook(self, name: str, module: nn.Module):
        def hook(param):
            grad = param.grad.T if is_conv1d(module) else param.grad
            self.stat.update(self.state_for(name, module), grad.to(self.where, torch.float32), self.batch_tokens)
            param.grad = None

        return hook

    def batch(self, batch: dict) -> None:
        labels = batch.get("labels")
        self.batch_tokens = (labels[:, 1:] != -100).sum() if labels is not None else batch["input_ids"].numel()
        loss = self.loss_fn(self.model, batch)
        if not torch.isfinite(loss):
            raise ValueError(f"the loss is {float(loss)} on a calibration batch: check its labels (all -100?).")
        loss.backward()
        self.batches += 1
        self.samples += batch["input_ids"].shape[0]
        self.tokens += int(self.batch_tokens)

    def close(self) -> None:
        super().close()
        for p, flag in self.flags.items():
            p.requires_grad_(flag)
            p.grad = self.grads[p]


def _model_loss(model: nn.Module, batch: dict) -> Tensor:
    if batch.get("labels") is None:
        raise ValueError("gradient statistics need the loss: give the calibration batches 'labels' (or pass loss=).")
    out = model(**batch)
    loss = getattr(out, "loss", None)
    if loss is None:
        raise ValueError(f"{type(model).__name__} returns no loss; pass calibrate(..., loss=fn(model, batch)).")
    return loss


def _all_gather_rows(rows: Tensor) -> Tensor:
    """Concatenate every rank's (N_r × k) rows in rank order (N_r may differ)."""
    dist = torch.distributed
    world = dist.get_world_size()
    size = torch.tensor([rows.shape[0]], device=rows.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    most = int(max(s.item() for s in sizes))
    padded = torch.zeros(most, *rows.shape[1:], dtype=rows.dtype, device=rows.device)
    padded[: rows.shape[0]] = rows
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])


def _same_tensor(a: Tensor, b: Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype
