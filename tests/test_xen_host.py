"""Xen reaches the machine only through :class:`xenicorn.xen.host.XenHost`.

Every ``host.NAME`` (``self.host``, ``xen.host``, ``call.xen.host``, a local
``host``) in xenicorn/xen/ must be a member of the protocol, and the
machine must provide every member: the interface is what both sides say.
"""
from __future__ import annotations

import ast
import typing
from pathlib import Path

import pytest

from xenicorn.machine import Machine, MachineConfig
from xenicorn.xen.host import XenHost

XEN = Path(__file__).resolve().parent.parent / "xenicorn" / "xen"


def protocol_members() -> set[str]:
    names = set(typing.get_type_hints(XenHost))
    names |= {n for n, v in vars(XenHost).items() if not n.startswith("_") and callable(v)}
    return names


def host_uses(path: Path) -> set[tuple[str, int]]:
    """(attribute, line) for every ``<...>.host.attr`` and ``host.attr`` in ``path``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Attribute):
            continue
        value = node.value
        if (isinstance(value, ast.Attribute) and value.attr == "host") or \
                (isinstance(value, ast.Name) and value.id == "host"):
            found.add((node.attr, node.lineno))
    return found


@pytest.mark.parametrize("path", sorted(p.relative_to(XEN).as_posix() for p in XEN.rglob("*.py")))
def test_xen_uses_only_the_host_protocol(path):
    members = protocol_members()
    bad = sorted((name, line) for name, line in host_uses(XEN / path) if name not in members)
    assert not bad, f"xen/{path} reaches past XenHost: {bad}"


def test_the_uses_are_found_at_all():
    uses = {name for p in XEN.rglob("*.py") for name, _ in host_uses(p)}
    assert {"memory", "clock", "watch_block_starts", "set_hypercall_handler"} <= uses


def test_the_machine_provides_every_member():
    m = Machine(MachineConfig(serial="none", debugcon="none", xen=False))
    try:
        missing = sorted(n for n in protocol_members() if not hasattr(m, n))
        assert not missing, f"Machine lacks {missing}"
    finally:
        m.close()
