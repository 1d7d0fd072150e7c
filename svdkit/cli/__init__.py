"""The `svdkit` command line: one module per subcommand, each a thin mapping of options onto the library.

A subcommand module defines ``add_parser(subparsers)`` and ``run(args) -> int``; :data:`COMMANDS` lists them
in the order ``svdkit --help`` shows them.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from svdkit import __version__

COMMANDS = ("methods", "finetune", "export", "demo", "bench", "inspect", "compress", "merge", "pretrain")
# What a user did wrong (bad option, missing file, refused folder): printed as one line, exit 2. Anything
# else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, ImportError)


def _module(name: str):
    return importlib.import_module(f"svdkit.cli.{name}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="svdkit", description="Spectral (SVD-based) adaptation of pretrained models.")
    p.add_argument("--version", action="version", version=f"svdkit {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        _module(name).add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _module(args.command.replace("-", "_")).run(args)
    except USER_ERRORS as exc:
        print(f"svdkit: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
