"""The packages' lazy public API: every name resolves, type checkers see the same names, torch loads on use."""

from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

import siamese_omniglot
import siamese_omniglot.data

PACKAGES = [siamese_omniglot, siamese_omniglot.data]


def _type_checking_imports(package) -> dict[str, str]:
    """Each name the package's ``if TYPE_CHECKING:`` block imports, with its relative module."""
    tree = ast.parse(Path(package.__file__).read_text())
    block = next(node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING")
    return {alias.name: "." * node.level + node.module for node in block.body for alias in node.names}


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.__name__)
def test_every_public_name_resolves_to_its_module_s_object(package) -> None:
    modules = {name: module for module, names in package._MODULES.items() for name in names}
    assert sorted(package.__all__) == sorted(modules)
    assert _type_checking_imports(package) == modules  # what IDEs and type checkers see is what runs
    for name, module in modules.items():
        assert getattr(package, name) is getattr(importlib.import_module(module, package.__name__), name)
    assert set(package.__all__) <= set(dir(package))


def test_import_loads_torch_only_when_a_name_needs_it() -> None:
    code = ("import sys, siamese_omniglot as so; print('torch' in sys.modules); so.TrainConfig; so.DataError; "
            "print('torch' in sys.modules); so.Verifier; print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["False", "False", "True"], result.stderr


def test_submodules_are_attributes_and_unknown_names_are_attribute_errors() -> None:
    assert siamese_omniglot.devices is importlib.import_module("siamese_omniglot.devices")
    assert siamese_omniglot.data.pairs is importlib.import_module("siamese_omniglot.data.pairs")
    with pytest.raises(AttributeError, match="module 'siamese_omniglot' has no attribute 'no_such_name'"):
        siamese_omniglot.no_such_name  # noqa: B018
    with pytest.raises(AttributeError, match="has no attribute 'data.roots'"):
        getattr(siamese_omniglot, "data.roots")  # a dotted path is no attribute, though it names a module
    assert not hasattr(siamese_omniglot.data, "no_such_name")
    code = "import siamese_omniglot; print(hasattr(siamese_omniglot, '__main__'))"  # a process that never ran it
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stdout) == (0, "False\n"), result.stderr  # it ran the command line before


def test_a_submodule_s_own_missing_import_is_not_hidden_as_a_missing_attribute(tmp_path: Path) -> None:
    package = tmp_path / "lazy_probe"
    package.mkdir()
    (package / "__init__.py").write_text("from siamese_omniglot._lazy import lazy_exports\n"
                                         "_MODULES = {'.broken': ('thing',)}\n"
                                         "__getattr__, __dir__ = lazy_exports(__name__, _MODULES)\n")
    (package / "broken.py").write_text("import no_such_dependency_for_this_test\nthing = 1\n")
    code = ("import lazy_probe\n"
            "for name in ('thing', 'broken', 'absent'):\n"
            "    try: getattr(lazy_probe, name)\n"
            "    except Exception as error: print(type(error).__name__, error)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            env=os.environ | {"PYTHONPATH": str(tmp_path)})
    missing = "ModuleNotFoundError No module named 'no_such_dependency_for_this_test'"
    absent = "AttributeError module 'lazy_probe' has no attribute 'absent'"
    assert result.stdout.splitlines() == [missing, missing, absent], result.stderr
