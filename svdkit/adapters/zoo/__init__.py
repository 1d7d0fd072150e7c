"""One file per method family. Every module in this folder is imported here, which registers its
methods; adding a method is adding a file (plus its row in tests/test_conformance.py)."""

import importlib
import pkgutil

for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")
