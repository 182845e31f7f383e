"""Each package's public API, declared in its `__init__.py`, checked both ways.

A package's docstring has a section `Public API:` that lists its public modules and, under each,
the names the rest of fedtune uses:

    Public API:

    - module: what it is
      - name: what it is

and its `__all__` holds the same module names, in the same order. Every listed module must import
and define every name listed under it; every use of a package from outside it — in src/ (the other
packages and the top-level modules) and in bench/ — must name a listed module and a listed name, so
the list cannot go stale. A use is an import (`from fedtune.pkg.module import name`,
`from fedtune.pkg import module`, `import fedtune.pkg.module`), an attribute of an imported module,
a string naming a module or `module:attribute` (the commands `fedtune.cli` loads, `python -m`
targets, app references), the Flower app components in pyproject.toml, and the `register` function
of every command module `fedtune.cli` loads.
"""

from __future__ import annotations

import ast
import importlib
import re
import tomllib
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "fedtune"
CONSUMER_DIRS = (ROOT / "src", ROOT / "bench")

PACKAGES = (
    "accounting",
    "compression",
    "data",
    "evaluation",
    "federation",
    "leaderboard",
    "model",
    "runtime",
    "training",
)

HEADING = "Public API:"
MODULE_LINE = re.compile(r"- (\w+): \S.*")
NAME_LINE = re.compile(r"  - (\w+): \S.*")
# A whole string naming a module of a package, optionally with an attribute (`pkg.module:attr`).
MODULE_STRING = re.compile(r"fedtune\.(\w+)\.(\w+)(?::(\w+))?")


def declared_api(package: str) -> dict[str, list[str]]:
    """Module → names, parsed from the package docstring's `Public API:` section (to its end)."""
    doc = importlib.import_module(f"fedtune.{package}").__doc__ or ""
    assert HEADING in doc, f"fedtune.{package}: no {HEADING!r} section in the docstring"
    api: dict[str, list[str]] = {}
    current: str | None = None
    for line in doc.split(HEADING, 1)[1].splitlines():
        if not line.strip():
            continue
        if module := MODULE_LINE.fullmatch(line):
            current = module.group(1)
            assert current not in api, f"fedtune.{package}: module {current} listed twice"
            api[current] = []
        elif (name := NAME_LINE.fullmatch(line)) and current is not None:
            assert name.group(1) not in api[current], f"{package}.{current}.{name.group(1)} twice"
            api[current].append(name.group(1))
        else:
            raise AssertionError(
                f"fedtune.{package}: {line!r} is neither '- module: …' nor '  - name: …'"
            )
    return api


@pytest.mark.parametrize("package", PACKAGES)
def test_docstring_lists_the_modules_of_all(package):
    module = importlib.import_module(f"fedtune.{package}")
    exported = module.__all__
    assert all(isinstance(name, str) for name in exported)
    assert len(set(exported)) == len(exported)
    assert list(declared_api(package)) == exported


@pytest.mark.parametrize("package", PACKAGES)
def test_listed_modules_import_and_define_their_names(package):
    for name, names in declared_api(package).items():
        module = importlib.import_module(f"fedtune.{package}.{name}")
        missing = [attr for attr in names if not hasattr(module, attr)]
        assert not missing, f"fedtune.{package}.{name} lacks {missing}"


@pytest.mark.parametrize("package", PACKAGES)
def test_names_a_package_exports_itself_are_listed(package):
    """A name importable from the package itself (a re-export) is a listed name of its module."""
    api = declared_api(package)
    pkg = importlib.import_module(f"fedtune.{package}")
    for attr, value in vars(pkg).items():
        if attr.startswith("__") or isinstance(value, types.ModuleType):
            continue
        origins = [
            name
            for name, names in api.items()
            if attr in names
            and getattr(importlib.import_module(f"fedtune.{package}.{name}"), attr) is value
        ]
        assert origins, f"fedtune.{package}.{attr} is not listed under the module it comes from"


@dataclass(frozen=True)
class Use:
    """`fedtune.<package>.<module>` used from `where`; `name` is what of it, when known."""

    where: str
    package: str
    module: str
    name: str | None


def owner(path: Path) -> str | None:
    """The package a source file belongs to (None for top-level modules and bench/)."""
    parts = path.relative_to(ROOT).parts
    return parts[2] if parts[:2] == ("src", "fedtune") and len(parts) > 3 else None


def is_module(package: str, name: str) -> bool:
    return (SRC / package / f"{name}.py").is_file() or (SRC / package / name).is_dir()


def dotted(node: ast.expr, aliases: dict[str, str]) -> str | None:
    """`a.b.c` as text, with `a` replaced by the module it was imported as."""
    if isinstance(node, ast.Name):
        return aliases.get(node.id, node.id)
    if isinstance(node, ast.Attribute) and (base := dotted(node.value, aliases)):
        return f"{base}.{node.attr}"
    return None


def uses_in(path: Path) -> Iterator[Use]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    here = owner(path)
    aliases: dict[str, str] = {}  # local name → the fedtune module it stands for

    def use(line: int, package: str, module: str, name: str | None) -> Iterator[Use]:
        if package in PACKAGES and package != here:
            yield Use(f"{path.relative_to(ROOT)}:{line}", package, module, name)

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            parts = node.module.split(".")
            if parts[0] != "fedtune" or len(parts) < 2:
                continue
            for alias in node.names:
                if len(parts) == 2:  # `from fedtune.pkg import module_or_reexport`
                    if is_module(parts[1], alias.name):
                        aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
                    yield from use(node.lineno, parts[1], "", alias.name)
                else:
                    yield from use(node.lineno, parts[1], ".".join(parts[2:]), alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "fedtune" and len(parts) > 2:
                    if alias.asname:
                        aliases[alias.asname] = alias.name
                    yield from use(node.lineno, parts[1], ".".join(parts[2:]), None)
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and (match := MODULE_STRING.fullmatch(node.value))
        ):
            yield from use(node.lineno, match[1], match[2], match[3])
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and (text := dotted(node, aliases)):
            parts = text.split(".")
            if parts[0] == "fedtune" and len(parts) >= 4:
                yield from use(node.lineno, parts[1], parts[2], parts[3])


def all_uses() -> Iterator[Use]:
    for directory in CONSUMER_DIRS:
        for path in sorted(directory.rglob("*.py")):
            yield from uses_in(path)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    for reference in pyproject["tool"]["flwr"]["app"]["components"].values():
        if match := MODULE_STRING.fullmatch(reference):
            yield Use("pyproject.toml", match[1], match[2], match[3])
    from fedtune.cli import COMMAND_MODULES

    for module in COMMAND_MODULES:
        parts = module.split(".")
        if len(parts) == 3 and parts[1] in PACKAGES:
            yield Use("fedtune.cli.COMMAND_MODULES", parts[1], parts[2], "register")


def undeclared(use: Use, api: dict[str, list[str]]) -> str | None:
    """Why a use is not covered by the package's declared API (None when it is)."""
    target = f"fedtune.{use.package}"
    if not use.module:  # `from fedtune.pkg import X`: a listed module, or a listed re-export
        listed = any(use.name in names for names in api.values())
        if use.name in api or (listed and hasattr(importlib.import_module(target), use.name)):
            return None
        return f"{target}.{use.name} is neither a listed module nor a listed name"
    if use.module not in api:
        return f"{target}.{use.module} is not a listed module"
    if use.name is not None and use.name not in api[use.module]:
        return f"{target}.{use.module}.{use.name} is not listed under {use.module}"
    return None


def test_every_use_from_outside_a_package_is_declared():
    apis = {package: declared_api(package) for package in PACKAGES}
    uses = list(all_uses())
    # The scan itself works: these uses are known to exist.
    found = {(use.package, use.module, use.name) for use in uses}
    assert ("federation", "server_app", "app") in found  # pyproject.toml's serverapp
    assert ("evaluation", "sampling", "fixed_subset") in found  # an import in src/
    assert ("evaluation", "flowertune", "encode_prompt") in found  # an attribute, in bench/
    assert ("data", "cli", "register") in found  # a command module of fedtune.cli
    problems = sorted(
        {f"{use.where}: {why}" for use in uses if (why := undeclared(use, apis[use.package]))}
    )
    assert not problems, "\n".join(problems)


def test_no_private_name_crosses_a_package():
    private = sorted(
        f"{use.where}: fedtune.{use.package}.{use.module}.{use.name}"
        for use in all_uses()
        if use.name and use.name.startswith("_")
    )
    assert not private, "\n".join(private)
