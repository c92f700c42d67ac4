"""The layering of STYLE.md habit 1, read from the source with :mod:`ast` (nothing is imported).

Layers point one way, ``runtime`` <- ``migrate`` <- ``balancer``: runtime imports neither
migrate nor balancer, migrate does not import balancer.  One module owns each outside system:
ctypes (libc and raw syscalls) only in ``runtime/syscalls.py``, pycriu only in
``migrate/criu.py``, ZeroMQ only in ``migrate/transport.py`` and ``migrate/keys.py`` (the
CURVE certificate files are ZeroMQ's own format, written and read by pyzmq's zmq.auth; no
socket or context there).  Every import counts: at the top, inside a function, under
``TYPE_CHECKING``, relative, or ``importlib.import_module("...")`` with a literal name.
Tests and benchmarks may drive an outside system to verify the product; what they must not do
is import from a conftest.py or a test module (pytest imports those under other names, so the
module would run twice): shared code lives in tests/helpers and tests/fakes.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("runtime", "migrate", "balancer")

#: package -> the packages of this repository it must never import
FORBIDDEN_LAYERS = {"runtime": ("migrate", "balancer"), "migrate": ("balancer",), "balancer": ()}

#: outside system (top-level module) -> the only files that may import it
OWNERS = {
    "ctypes": ("runtime/syscalls.py",),
    "pycriu": ("migrate/criu.py",),
    "zmq": ("migrate/transport.py", "migrate/keys.py"),
    "etcd3gw": ("migrate/cluster_state/etcd.py",),
}


@dataclass(frozen=True)
class Import:
    """One imported module: ``file`` (relative to the repo), ``line``, the absolute
    dotted ``module`` name."""

    file: str
    line: int
    module: str

    @property
    def top(self) -> str:
        return self.module.split(".")[0]

    def __str__(self) -> str:
        return f"{self.file}:{self.line} imports {self.module}"


def imports_in(source: str, file: str) -> Iterator[Import]:
    """Every module that ``source``, the text of ``file`` (a path relative to the repository,
    such as ``runtime/cli.py``), imports; relative imports made absolute."""
    parts = file.removesuffix(".py").split("/")
    package = parts[:-1]  # the package a relative import starts from (also for __init__.py)
    for node in ast.walk(ast.parse(source, filename=file)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(file, node.lineno, alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            yield Import(file, node.lineno, module)
            for alias in node.names:  # `from migrate import criu` imports migrate.criu
                yield Import(file, node.lineno, f"{module}.{alias.name}")
        elif (
            isinstance(node, ast.Call)
            and _called_name(node.func) in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            yield Import(file, node.lineno, node.args[0].value)


def _called_name(func: ast.expr) -> str | None:
    if isinstance(func, ast.Attribute):
        return func.attr
    if isinstance(func, ast.Name):
        return func.id
    return None


def product_files() -> list[Path]:
    files = sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py"))
    assert files, f"no Python files under {REPO}/{{{','.join(PACKAGES)}}}"
    return files


@functools.cache
def product_imports() -> tuple[Import, ...]:
    return tuple(
        imp for f in product_files() for imp in imports_in(f.read_text(), str(f.relative_to(REPO)))
    )


@pytest.mark.parametrize("package", PACKAGES)
def test_layers_point_one_way(package: str) -> None:
    bad = sorted(
        {
            str(imp)
            for imp in product_imports()
            if imp.file.startswith(f"{package}/") and imp.top in FORBIDDEN_LAYERS[package]
        }
    )
    assert not bad, (
        f"{package} must not import {' or '.join(FORBIDDEN_LAYERS[package])} (STYLE.md habit "
        f"1; invert the dependency, as runtime.cli.CliExtension does):\n" + "\n".join(bad)
    )


@pytest.mark.parametrize("system", sorted(OWNERS))
def test_one_module_owns_each_outside_system(system: str) -> None:
    bad = sorted(
        {
            str(imp)
            for imp in product_imports()
            if imp.top == system and imp.file not in OWNERS[system]
        }
    )
    assert not bad, (
        f"only {', '.join(OWNERS[system])} may import {system}: call it through that "
        "module instead:\n" + "\n".join(bad)
    )


def test_tests_import_helpers_not_conftests_or_test_modules() -> None:
    files = sorted(p for d in ("tests", "benchmarks") for p in (REPO / d).rglob("*.py"))
    bad = sorted(
        {
            str(imp)
            for f in files
            for imp in imports_in(f.read_text(), str(f.relative_to(REPO)))
            if imp.top in ("tests", "conftest")
            and any(
                part == "conftest" or part.startswith("test_") for part in imp.module.split(".")
            )
        }
    )
    assert not bad, (
        "move what these import into tests/helpers (or tests/fakes); a conftest.py holds "
        "fixtures only:\n" + "\n".join(bad)
    )


def test_the_owners_exist_and_import_what_they_own() -> None:
    """Guards the two tests above against a rename that would make them check nothing."""
    seen = {(imp.file, imp.top) for imp in product_imports()}
    for system, owners in OWNERS.items():
        for owner in owners:
            assert (owner, system) in seen, f"{owner} no longer imports {system}: update OWNERS"


def test_the_reader_sees_every_kind_of_import() -> None:
    source = (
        "import ctypes.util\n"
        "from . import state\n"
        "from ..migrate import criu\n"
        "from .cgroups.v2 import V2Manager\n"
        "if TYPE_CHECKING:\n"
        "    from balancer import policy\n"
        "def f():\n"
        "    import zmq\n"
        "    importlib.import_module('pycriu.images')\n"
    )
    found = {imp.module for imp in imports_in(source, "runtime/probe.py")}
    assert found >= {
        "ctypes.util",
        "runtime.state",
        "migrate.criu",
        "runtime.cgroups.v2",
        "balancer.policy",
        "zmq",
        "pycriu.images",
    }, found
    assert {imp.module for imp in imports_in("from . import x\n", "migrate/__init__.py")} >= {
        "migrate.x"
    }


def test_test_modules_outside_packages_have_unique_names() -> None:
    """tests/unit and tests/linux are not packages: pytest imports their files by base
    name, and two files of one name in them stop the whole run at collection."""
    root = Path(__file__).resolve().parents[1]
    seen: dict[str, Path] = {}
    clashes = []
    for d in ("unit", "linux"):
        for p in sorted((root / d).glob("test_*.py")):
            if p.name in seen:
                clashes.append(f"{seen[p.name].relative_to(root)} and {p.relative_to(root)}")
            seen[p.name] = p
    assert not clashes, f"rename one of each: {clashes}"
