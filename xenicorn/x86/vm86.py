"""Events taken in virtual-8086 mode: the checks and the longer frame.

Virtual-8086 mode (EFLAGS.VM=1, protected mode, not IA-32e) runs real-mode
code at CPL 3 under a protected-mode kernel: segment registers hold
paragraph numbers (base = selector << 4, limit 0xFFFF) as in real mode, but
every interrupt and exception goes through the protected-mode IDT to a
ring-0 handler (Intel SDM vol. 3 §20.3, "Interrupt and Exception Handling
in Virtual-8086 Mode"). Delivery is the inter-privilege case of
§6.12.1, with three differences:

* the handler must run in ring 0: the gate's code segment must be
  nonconforming with DPL 0, anything else is #GP(code selector + EXT)
  (SDM vol. 2A, INT n pseudo-code, "IF VM = 1 ... new code-segment DPL ≠ 0");
* before SS and ESP the CPU pushes the four data segment registers, so the
  ring-0 stack holds nine dwords (plus the error code)::

      +32 GS   +28 FS   +24 DS   +20 ES   +16 SS   +12 ESP
       +8 EFLAGS (VM=1)  +4 CS   +0 EIP   [-4 error code]

  and then loads GS, FS, DS and ES with null selectors, because vm86
  paragraph numbers mean nothing to the protected-mode handler;
* ``INT n`` is IOPL-sensitive (SDM vol. 3 §20.2.7, table 20-2): with
  IOPL < 3 (and no VME, which this CPU does not offer: :mod:`.cpuid`) it
  raises #GP(0) at the INT instead, so a vm86 monitor can emulate it. INT3
  (0xCC), INTO and INT1 (0xF1) are not IOPL-sensitive; they only pass the
  gate's DPL check like any INT from CPL 3. ``CD 03`` is an ``INT n``.

The way back is IRET at CPL 0 with VM=1 in the popped EFLAGS: it pops EIP,
CS, EFLAGS, ESP, SS, ES, DS, FS, GS and loads all six segments the vm86 way.
The CPU engine (QEMU's ``helper_iret_protected``, label ``return_to_vm86``)
does that itself, enters vm86 by task switch itself, and runs vm86 code
itself (its translator raises the IOPL #GP for ``INT n``); only delivery
is done here (:mod:`.interrupts` calls these helpers from its
protected-mode path). Every event from vm86 reaches it: the engine's own
delivery of external interrupts would send a handler segment of DPL 1 or 2
to that ring instead of raising #GP, so it is not used in vm86
(:mod:`xenicorn.engine.delivery`).
"""
from __future__ import annotations

from .segments import SegmentCache

IOPL_SHIFT = 12


def vm86_int_check(rflags: int, fault) -> None:
    """``INT n`` in vm86 with IOPL < 3: #GP(0), before the IDT is read (SDM vol. 2A, INT n)."""
    if (rflags >> IOPL_SHIFT) & 3 != 3:
        raise fault(13, 0, why=f"INT n in virtual-8086 mode with IOPL {(rflags >> IOPL_SHIFT) & 3} < 3")


def vm86_handler_check(selector: int, code: SegmentCache, ext: int, fault) -> None:
    """The handler's code segment must be nonconforming with DPL 0, else #GP(selector)."""
    conforming = bool(code.flags & (1 << 10))
    if conforming or code.dpl != 0:
        raise fault(13, (selector & 0xFFFC) | ext,
                    why=f"handler segment {selector:#x} of an event from virtual-8086 mode is "
                        + ("conforming" if conforming else f"DPL {code.dpl}, not 0"))


def vm86_saved_segments(selectors: dict[str, int]) -> list[tuple[str, int]]:
    """The four data segment selectors pushed first, in push order (GS first)."""
    return [(name, selectors[name]) for name in ("gs", "fs", "ds", "es")]


def vm86_null_segments() -> dict[str, SegmentCache]:
    """Null ES/DS/FS/GS for the handler (QEMU loads the caches all zero, so do we)."""
    return {name: SegmentCache(0, 0, 0, 0) for name in ("es", "ds", "fs", "gs")}
