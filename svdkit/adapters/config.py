"""Adapter configs: the options every adaptation method shares, validated at construction.

A method is one frozen config class registered with :func:`svdkit.core.registry.register`. Its fields are
the user-facing options; its ``initialize`` turns a batch of same-shaped weights into adapter factors (see
:class:`svdkit.adapters.layers.Init`). Configs serialize to JSON with ``_type`` and ``_version``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

import torch

from svdkit.core.registry import config_to_dict

if TYPE_CHECKING:
    from svdkit.adapters.layers import Init

# Fields a per-module override may change (everything that is about one layer, not about selection).
_OVERRIDABLE = {"rank", "alpha", "svd", "niter", "oversample", "seed", "dropout", "use_rslora", "fold"}
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class AdapterConfig:
    """Options every method shares.

    rank:        adapter rank r (per module: must be < min(out, in)).
    alpha:       scaling numerator; ``None`` means alpha = rank. s = alpha/r, or alpha/√r with ``use_rslora``
                 (methods that ignore ``rank``: s = alpha, None meaning 1; ``use_rslora`` is refused there).
    targets:     a preset (``"all-linear"``, ``"attention"``, ``"mlp"``) or regex(es) searched in module names.
    exclude:     regex of module names to leave alone.
    svd:         ``"exact"`` (LAPACK) or ``"randomized"`` (seeded, oversampled, power iterations).
    niter, oversample: randomized-SVD power iterations and extra sketch columns.
    seed:        base seed; each layer draws from ``layer_seed(seed, module_name)``.
    dropout:     dropout on the adapter's input (training only).
    fold:        ``False`` keeps the original weight untouched and subtracts the frozen initial factors
                 in the forward; ``True`` replaces the weight by the residual (faster, approximate unadapt).
    compute_dtype: ``"float32"`` or ``"float64"`` for the decomposition, whatever the storage dtype.
    overrides:   ``{regex: {field: value}}`` applied, in order, to modules whose name matches.
    """

    rank: int = 16
    alpha: float | None = None
    targets: str | tuple[str, ...] = "all-linear"
    exclude: str | None = None
    svd: str = "exact"
    niter: int = 4
    oversample: int = 8
    seed: int = 0
    dropout: float = 0.0
    use_rslora: bool = False
    fold: bool = False
    compute_dtype: str = "float32"
    overrides: dict = field(default_factory=dict)

    # Filled in by each method class; shown by `svdkit methods`.
    name: ClassVar[str] = ""
    kind: ClassVar[str] = "adapt"  # the family (svdkit.methods(kind))
    basis: ClassVar[str] = ""
    trains: ClassVar[str] = ""
    params: ClassVar[str] = ""
    export_rank: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    uses_calibration: ClassVar[bool] = False  # data-aware methods take svdkit.calibrate() statistics
    calibration_samples: ClassVar[int] = 64  # the paper's number of calibration samples (finetune's default)
    exports_lora: ClassVar[bool] = True  # False: the update is not low-rank; ship merged weights instead
    batched: ClassVar[bool] = True  # False: layers get their own ranks, so each is initialized alone
    uses_rank: ClassVar[bool] = True  # False: the method adapts the full spectrum and ignores ``rank``
    core_type: ClassVar[type | None] = None  # the svdkit.adapters.cores.Core subclass that make_core builds
    prunes: ClassVar[bool] = False  # True: zero diagonal-core entries are pruned directions, left out of the export
    regularizer_mean: ClassVar[bool] = False  # True: svdkit.regularization averages the per-layer terms (AdaLoRA)
    lr: ClassVar[float] = 2e-4  # the paper's learning rate (svdkit finetune's default for the method)
    weight_decay: ClassVar[float] = 0.0  # 0 for adapters initialized from principal components

    def __post_init__(self) -> None:
        cls = type(self).__name__
        if isinstance(self.targets, list):
            object.__setattr__(self, "targets", tuple(self.targets))
        if not _is_int(self.rank) or self.rank <= 0:
            raise ValueError(f"{cls}: rank must be a positive integer, got {self.rank!r}.")
        if self.alpha is not None and not (_is_real(self.alpha) and self.alpha > 0):
            raise ValueError(f"{cls}: alpha must be a positive finite number or None (= rank), got {self.alpha!r}.")
        if self.use_rslora and not self.uses_rank:
            raise ValueError(f"{cls} ignores rank, so use_rslora (s = alpha/√rank) does not apply; set alpha for s.")
        if self.svd not in ("exact", "randomized"):
            raise ValueError(f"{cls}: svd must be 'exact' or 'randomized', got {self.svd!r}.")
        for name in ("niter", "oversample", "seed"):
            value = getattr(self, name)
            if not _is_int(value) or (value < 0 and name != "seed"):
                raise ValueError(f"{cls}: {name} must be an integer{'' if name == 'seed' else ' >= 0'}, got {value!r}.")
        if not (_is_real(self.dropout) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"{cls}: dropout must be a number in [0, 1), got {self.dropout!r}.")
        for name in ("use_rslora", "fold"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{cls}: {name} must be True or False, got {getattr(self, name)!r}.")
        if not (isinstance(self.targets, str) or (self.targets and all(isinstance(t, str) for t in self.targets))):
            raise ValueError(f"{cls}: targets must be a preset name, a regex or a list of them, got {self.targets!r}.")
        if self.exclude is not None and not isinstance(self.exclude, str):
            raise ValueError(f"{cls}: exclude must be a regex string or None, got {self.exclude!r}.")
        if not isinstance(self.overrides, dict) or not all(isinstance(v, dict) for v in self.overrides.values()):
            raise ValueError(f"{cls}: overrides must be {{regex: {{field: value}}}}, got {self.overrides!r}.")
        if self.compute_dtype not in _DTYPES:
            raise ValueError(f"{cls}: compute_dtype must be one of {sorted(_DTYPES)}, got {self.compute_dtype!r}.")
        for pattern in _as_tuple(self.targets) + ((self.exclude,) if self.exclude else ()):
            _compile(pattern, cls)
        for pattern, values in self.overrides.items():
            _compile(pattern, cls)
            bad = set(values) - _OVERRIDABLE
            if bad:
                raise ValueError(
                    f"{cls}: override {pattern!r} sets {sorted(bad)}, which cannot vary per module; "
                    f"overridable fields: {sorted(_OVERRIDABLE)}."
                )
            try:  # the overridden values pass the same checks (this class's __post_init__)
                dataclasses.replace(self, **values, overrides={})
            except ValueError as exc:
                raise ValueError(f"override {pattern!r}: {exc}") from None

    # -- derived values ---------------------------------------------------------------------------
    @property
    def scaling(self) -> float:
        """s = alpha / r, or alpha / √r with rsLoRA (https://arxiv.org/abs/2312.03732).

        Methods that ignore ``rank`` (``uses_rank = False``) never let it into s: s = alpha (None: 1).
        """
        if not self.uses_rank:
            return 1.0 if self.alpha is None else float(self.alpha)
        alpha = self.rank if self.alpha is None else self.alpha
        return alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.compute_dtype]

    def for_module(self, module_name: str) -> "AdapterConfig":
        """This config with every override whose regex is found in ``module_name`` applied."""
        changes: dict[str, Any] = {}
        for pattern, values in self.overrides.items():
            if re.search(pattern, module_name):
                changes.update(values)
        return dataclasses.replace(self, **changes) if changes else self

    # -- the method hook ----------------------------------------------------------------------------
    def initialize(self, weights: torch.Tensor, names: Sequence[str], calibration=None) -> "Init":
        """Adapter factors for a batch of same-shaped weights ``(b, m, n)`` named ``names``."""
        raise NotImplementedError(f"{type(self).__name__} does not define initialize().")

    # Modules decomposed together (CLOVER's v_proj/o_proj pair of an MHA block). ``groups`` is called once
    # with the target names and every linear module of the model not excluded, by name; each group it
    # returns (names, which may include linears that are not targets) is initialized by one call of
    # ``initialize_group`` with the groups' (out × in) weights (views: never write into them), which
    # returns one Init per module (b = 1). Both are called on the model-level config: use
    # ``self.for_module(name)`` for a module's own fields (scaling). Default: no groups.
    def groups(self, targets: Sequence[str], linears: dict) -> list[tuple[str, ...]]:
        """Names of modules to initialize together (default none: every target alone)."""
        return []

    def initialize_group(self, weights: Sequence[torch.Tensor], names: Sequence[str], calibration=None) -> list["Init"]:
        """One Init (b = 1) per module of a group returned by :meth:`groups`."""
        raise NotImplementedError(f"{type(self).__name__} returns groups but does not define initialize_group().")

    def for_model(self, model_config) -> "AdapterConfig":
        """This config completed from the model's own configuration (a Hugging Face ``PretrainedConfig``, or None
        for a model without one): a method whose options depend on the architecture (CLOVER's head size) fills
        them in or checks them here. ``svdkit.adapt`` calls it first; its result is saved. Default: this config."""
        return self

    def statistic(self):
        """What a data-aware method measures with ``svdkit.calibrate`` (a :class:`svdkit.core.calibration.Statistic`)."""
        raise NotImplementedError(f"{type(self).__name__} does not use calibration data.")

    def resolve(self, calibration, shapes: dict[str, tuple[int, int]]) -> "AdapterConfig":
        """The config to apply, given the statistics and every target's (out, in) shape: a data-aware method
        may return per-module ``overrides`` (EVA's redistributed ranks) and ``exclude`` modules. The result is
        what is saved with the adapter. Default: this config."""
        return self

    def make_core(self, tensors: dict[str, torch.Tensor]) -> "torch.nn.Module | None":
        """The trainable core C between B and A for one layer, from its ``Init.core`` (or saved) tensors.

        A core is an ``nn.Module`` whose ``forward()`` returns a vector (a diagonal C) or a matrix; its
        parameters and buffers must be exactly ``tensors`` (so that save/load round-trips). By default the
        method's ``core_type`` is built from them; override only when the core needs more (e.g. the rank).
        """
        return None if self.core_type is None else self.core_type.from_tensors(type(self).__name__, tensors)

    def regularizer(self, layer) -> torch.Tensor | None:
        """This method's extra loss for one adapted layer, or None (the default)."""
        return None

    # Output-space regularizers (BA-LoRA): svdkit.output_regularization(model, batch, outputs) calls
    # ``output_regularizer`` when ``uses_outputs``; ``base_outputs`` are the frozen original model's outputs
    # on the same batch (one extra no-grad forward, adapters disabled) when ``needs_base_outputs``, else None.
    uses_outputs: ClassVar[bool] = False
    needs_base_outputs: ClassVar[bool] = False

    def output_regularizer(self, outputs: torch.Tensor, base_outputs: torch.Tensor | None) -> torch.Tensor | None:
        """This method's loss on the model's outputs (e.g. the logits at the labelled positions), or None."""
        return None

    # Training-time hooks, called by svdkit's training loop and by svdkit.training.hf.SvdkitCallback through
    # svdkit.after_clipping / svdkit.after_step, so users never call them by hand.
    def after_clipping(self, layers: dict, peak_lr: float) -> None:
        """Edit the adapters' gradients after clipping, before the optimizer step (e.g. SORSA)."""

    def weight_decay_at(self, base: float, step: int, total_steps: int) -> float:
        """The optimizer's weight decay at step ``step`` (0-based) given the run's ``base`` value: constant
        by default; a method with a decay schedule (SoMA) overrides it."""
        return base

    def after_step(self, layers: dict, step: int, total_steps: int) -> None:
        """A training-time schedule run after each optimizer step (e.g. AdaLoRA's budget)."""

    def after_task(self, layers: dict) -> None:
        """Run once when a task of a continual sequence ends (``svdkit.continual``), e.g. Sculpting Subspaces
        recomputing the protected singular subspace of each weight. Default: nothing."""

    # Two data splits (bi-level methods, BiLoRA): svdkit's loop holds ``second_split()`` of the training items
    # apart as D₂ (seeded), trains step t on a batch of split ``split_at(t)`` and updates only the adapter
    # tensors whose ``split_of(tensor)`` is that split (the others' gradients are dropped before clipping).
    def second_split(self) -> float:
        """Fraction of the training items held apart as split 2 (0, the default: one split, every tensor trains)."""
        return 0.0

    def split_at(self, step: int) -> int:
        """The split (1 or 2) that training step ``step`` (0-based) draws its batch from and updates."""
        return 1

    def split_of(self, tensor: str) -> int:
        """The split (1 or 2) on which the adapter tensor ``tensor`` of a layer ("lora_A", "core.value", …) trains."""
        return 1

    # -- JSON ----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _as_tuple(targets: str | Sequence[str]) -> tuple[str, ...]:
    return (targets,) if isinstance(targets, str) else tuple(targets)


def _compile(pattern: str, owner: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"{owner}: {pattern!r} is not a valid regular expression ({exc}).") from None
