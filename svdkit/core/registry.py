"""The one registry of methods, shared by every family (adapt, compress, merge, optim).

A method is a frozen config dataclass with a unique ``name`` and a ``kind`` (its family), registered with
:func:`register`. ``svdkit.config(name, **fields)`` builds any method by name; configs serialize to JSON with
``_type`` (the name) and ``_version`` and read back equal (:func:`config_to_dict`, :func:`config_from_dict`).
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

CONFIG_VERSION = 1


class Refused(ValueError):
    """A method refuses this configuration on this model (a rank above a layer's size, …): a statement about
    the method, not a bug. ``svdkit bench`` records only this as a skipped row; any other error is a failure
    it retries on resume."""

KINDS = ("adapt", "compress", "merge", "optim")
_REGISTRY: dict[str, type] = {}


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """JSON form of a config: ``_type``, ``_version`` and every field (tuples as lists)."""
    out: dict[str, Any] = {"_type": cfg.name, "_version": CONFIG_VERSION}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


# -- the registry -----------------------------------------------------------------------------------
def register(cls: type) -> type:
    """Class decorator: make a config class available by its ``name`` (``svdkit.config(name)``) in its
    family ``cls.kind``. Names are unique across families."""
    if not getattr(cls, "name", "") or cls.name in _REGISTRY:
        raise ValueError(f"method class {cls.__name__} needs a unique, non-empty `name` (got {getattr(cls, 'name', '')!r}).")
    if getattr(cls, "kind", None) not in KINDS:
        raise ValueError(f"method class {cls.__name__}: kind must be one of {KINDS}, got {getattr(cls, 'kind', None)!r}.")
    _REGISTRY[cls.name] = cls
    return cls


def methods(kind: str | None = "adapt") -> list[str]:
    """Names of the registered methods of family ``kind`` (``"adapt"``, ``"compress"``, ``"merge"``,
    ``"optim"``; ``None``: every family), sorted."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown method family {kind!r}; families: {', '.join(KINDS)}.")
    return sorted(name for name, cls in _REGISTRY.items() if kind is None or cls.kind == kind)


def method_class(name: str) -> type:
    key = name.lower().replace("_", "-")
    if key not in _REGISTRY:
        close = difflib.get_close_matches(key, list(_REGISTRY), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown method {name!r}.{hint} Available: {', '.join(methods(None))}.")
    return _REGISTRY[key]


def config(name: str, **options: Any) -> Any:
    """The config of method ``name`` with ``options``: ``svdkit.config("pissa", rank=16)``."""
    cls = method_class(name)
    valid = {f.name for f in dataclasses.fields(cls)}
    unknown = set(options) - valid
    if unknown:
        raise TypeError(f"{cls.__name__} has no option(s) {sorted(unknown)}; valid options: {sorted(valid)}.")
    return cls(**options)


def config_from_dict(data: dict[str, Any]) -> Any:
    """Inverse of :func:`config_to_dict`."""
    data = dict(data)
    if "_type" not in data:
        raise ValueError("config dict has no '_type' field; it was not written by svdkit.")
    version = data.pop("_version", CONFIG_VERSION)
    if version > CONFIG_VERSION:
        raise ValueError(f"config version {version} is newer than this svdkit understands ({CONFIG_VERSION}); upgrade svdkit.")
    return config(data.pop("_type"), **data)
