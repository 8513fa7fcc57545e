"""Lazy attribute exports, so importing the package does not import peft, bitsandbytes or
transformers until an object that needs them is used."""
from __future__ import annotations

import importlib
from typing import Callable


def lazy_exports(package: str, exports: dict[str, str], submodules: tuple[str, ...] = ()
                 ) -> tuple[Callable[[str], object], Callable[[], list]]:
    """Returns module-level ``__getattr__`` and ``__dir__`` resolving ``name`` from the
    submodule ``exports[name]`` (relative to ``package``) on first use, and each name in
    ``submodules`` as that subpackage itself (``import lolakernels; lolakernels.peft``)."""

    def __getattr__(name: str):
        if name in submodules:
            return importlib.import_module(f".{name}", package)  # the import binds it on the package
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        globals_of_package = importlib.import_module(package).__dict__
        globals_of_package[name] = value
        return value

    def __dir__():
        return sorted(set(importlib.import_module(package).__dict__) | set(exports) | set(submodules))

    return __getattr__, __dir__
