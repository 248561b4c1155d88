"""The layering rules, checked by parsing every module's imports (as firecracker's CI checks its crate graph).

=====================  ======================================================
package                may not import
=====================  ======================================================
everything but         ``unicorn``, ``ctypes``: Unicorn and its private
``xenicorn/engine/``   layout stay behind the engine's typed interface
``xenicorn/devices/``  anything of xenicorn outside ``devices/`` (but the
                       record helpers, ``xenicorn.records``): chips get
                       callables, never the machine
``xenicorn/xen/``      ``xenicorn.engine``: Xen talks to the machine
``xenicorn/x86/``      ``xenicorn.engine``: the architecture sees a vCPU
                       protocol (``x86/cpu.py``), not Unicorn
=====================  ======================================================

and no module is longer than 600 lines. Every import counts, including
those inside functions and under ``TYPE_CHECKING``.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "xenicorn"
MAX_LINES = 600
ENGINE_ONLY = ("unicorn", "ctypes")
# Vocabulary below every layer: the snapshot record helpers (pure JSON checks).
FOUNDATION = "xenicorn.records"



def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports (``from . import x`` gives ``pkg.x`` and ``pkg``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)   # may be submodules
    return found


def top(name: str) -> str:
    return name.split(".")[0]


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


ALL = {rel(p): imports(p) for p in modules()}


def test_the_parser_sees_imports_of_every_kind():
    """The rules below would pass vacuously if the import parser were blind."""
    vcpu = ALL["xenicorn/engine/vcpu.py"]
    assert "unicorn" in vcpu and "unicorn.x86_const" in vcpu                       # absolute
    assert "xenicorn.exits" in vcpu and "xenicorn.engine.hooks" in vcpu           # relative, both levels
    assert "xenicorn.machine.machine" in vcpu                                      # under TYPE_CHECKING
    assert "xenicorn.x86.paging" in vcpu                                           # inside a function
    assert "xenicorn.engine" in ALL["xenicorn/cli.py"]                             # a package itself
    assert len(ALL) > 60


@pytest.mark.parametrize("path", sorted(ALL))
def test_only_the_engine_imports_unicorn_or_ctypes(path):
    if within(module_name(ROOT / path), "xenicorn.engine"):
        return
    bad = sorted(n for n in ALL[path] if top(n) in ENGINE_ONLY)
    assert not bad, f"{path} imports {bad}: only xenicorn/engine/ may (give the engine a typed service)"


@pytest.mark.parametrize("path", sorted(p for p in ALL if p.startswith("xenicorn/devices/")))
def test_devices_import_nothing_of_xenicorn_above_them(path):
    bad = sorted(n for n in ALL[path] if top(n) == "xenicorn" and not within(n, "xenicorn.devices")
                 and not within(n, FOUNDATION))
    assert not bad, f"{path} imports {bad}: a device gets callables, not the layers above it"


@pytest.mark.parametrize("path", sorted(p for p in ALL if p.startswith("xenicorn/xen/")))
def test_xen_reaches_the_machine_only_through_its_host_interface(path):
    """No machine module but guest memory's (its error type): the rest comes through xen/host.py."""
    bad = sorted(n for n in ALL[path]
                 if within(n, "xenicorn.machine") and n != "xenicorn.machine"
                 and not within(n, "xenicorn.machine.memory")
                 or within(n, "xenicorn.debug") or within(n, "xenicorn.boot") or within(n, "xenicorn.snapshot"))
    assert not bad, f"{path} imports {bad}: ask the machine through XenHost"


@pytest.mark.parametrize("path", sorted(p for p in ALL if p.startswith(("xenicorn/xen/", "xenicorn/x86/"))))
def test_xen_and_x86_never_import_the_engine(path):
    bad = sorted(n for n in ALL[path] if within(n, "xenicorn.engine"))
    assert not bad, f"{path} imports {bad}: reach the vCPU through its interface, not the engine"


@pytest.mark.parametrize("path", sorted(ALL))
def test_no_module_is_over_600_lines(path):
    lines = len((ROOT / path).read_text().splitlines())
    assert lines <= MAX_LINES, f"{path} has {lines} lines (at most {MAX_LINES}: split it along its seams)"
