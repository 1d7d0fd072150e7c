"""Shared option helpers for the subcommands."""

from __future__ import annotations


def add_field_options(parser, fields: dict, defaults: dict) -> None:
    """``--name`` options (default None: keep the config's value) for ``{name: (type, help)}``, each help
    ending with its default (``defaults[name]``: a value or a phrase)."""
    for name, (kind, text) in fields.items():
        default = defaults[name]
        shown = f"{default:g}" if isinstance(default, float) else default
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=f"{text} (default: {shown})")
