"""Lazy re-exports (PEP 562): a package names its public API without importing torch until a name is used.

``import siamese_omniglot`` and ``siamese --help`` then take a fraction of a second; the first use of a name
such as ``siamese_omniglot.Verifier`` imports its module, and later uses find it cached on the package.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping


def lazy_exports(
    package: str, modules: Mapping[str, tuple[str, ...]]
) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of ``package``, where ``modules`` maps each submodule (relative, like
    ``.verify``) to the public names it defines. Any submodule is reachable as an attribute too, as it would be
    after an eager import."""
    exports = {name: module for module, names in modules.items() for name in names}

    def submodule(name: str) -> object:
        if name.isidentifier() and not name.startswith("_"):  # "data.roots" names no attribute, "_lazy" none public
            try:
                return importlib.import_module(f".{name}", package)
            except ModuleNotFoundError as error:
                if error.name != f"{package}.{name}":  # the submodule exists and failed to import something
                    raise
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __getattr__(name: str) -> object:
        value = getattr(importlib.import_module(exports[name], package), name) if name in exports else submodule(name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__
