"""What the guest does without an exit, for a run record (``run --record``).

A run record (:class:`~xenicorn.debug.stepper.JsonLines`) sees the machine
at exits and interrupt events. Three things a reader of the timeline needs
happen in between, where no exit shows them:

* **The store that clears ``evtchn_upcall_pending``.** The flag is a byte of
  guest RAM (``struct vcpu_info``, xen/include/public/xen.h); the guest's
  upcall handler clears it with an ordinary store, and Xen learns of it only
  when it next looks. With ``--callback-deassert eoi`` it looks at the
  handler's EOI, some 50 instructions later, so a timeline built from
  samples shows the flag falling together with the line -- the one thing
  the picture should not hide. :class:`GuestWatch` puts a write watch on
  that byte (a Unicorn memory hook on its guest-physical address: the
  guest's own stores trigger it, Xen's writes from Python do not) and
  records each guest store that changes it, with the instruction count and
  address of the storing instruction: an ``upcall-store`` record. (Its
  ``insn``, like that of an MMIO EOI, is taken during the instruction and
  counts it: the benchmark's deassert latency, benchmarks/evtchn.py, counts
  the same way from a code hook on the guest's ``upcall_clear_store``.)
  The byte moves when the guest maps shared_info or registers a vcpu_info
  (``XENMAPSPACE_shared_info``, ``VCPUOP_register_vcpu_info``), so the watch
  follows it, checked between guest runs (a Unicorn hook is never added
  from inside another hook).
* **RFLAGS.IF.** CLI, STI, POPF and IRET change it without an exit. A
  block-start check (the engine's ``add_block_check``, a Python call per
  translated block: the record's main cost) writes an ``if`` record when
  vCPU 0's IF differs from the last one seen. IRET, STI and POPF end their
  block, so their change is seen at the next instruction; a CLI at the end
  of its block.
* **The guest's console lines.** The test kernels report each check as an
  ``ok ...`` line; a ``console`` record per completed line, at the exit
  that completed it, lets a plot label the phases of the run.

All three are watched only while a record is written; the write watch is
one memory hook on a 64-byte range, so it costs nothing on other stores.
"""
from __future__ import annotations

from typing import Callable

from ..engine import debugging
from ..machine.runloop import Agent

RFLAGS_IF = 1 << 9
MAX_LINE = 200                   # longest console text kept in a record


class GuestWatch(Agent):
    """Writes ``upcall-store``, ``if`` and ``console`` records through ``write`` (a record's line writer).

    A run-loop agent only for :meth:`before_run`, where hooks may be added
    (the IF check, once; the write watch, following vCPU 0's ``vcpu_info``);
    it never holds or bounds a run.
    """

    def __init__(self, machine, write: Callable[[dict], None]):
        self.machine = machine
        self.write = write
        self.gpa: int | None = None              # upcall_pending's guest-physical address, while watched
        self._hook = None
        self._console_at = len(machine.console.data)
        self._partial = b""
        self._if_hook = None
        self._if = 0
        machine.agents.append(self)
        machine.exit_listeners.append(self._after_exit)

    # -- the upcall_pending store ---------------------------------------------------------
    def before_run(self, vcpu, count: int) -> int:
        if self._if_hook is None:
            self._install_if_watch()
        self.follow()
        return count

    def follow(self) -> None:
        """Watch the byte where vCPU 0's ``upcall_pending`` lives now (between runs only)."""
        xen = self.machine.xen
        info = xen.vcpu_info(0) if xen is not None else None
        gpa = info.gpa if info is not None else None
        if gpa == self.gpa:
            return
        self.stop()
        if gpa is not None:
            # the vCPUs share one engine, so one hook sees every vCPU's stores
            self._hook = debugging.add_watchpoint(self.machine.vcpus[0], gpa, 1, debugging.WATCH_WRITE,
                                                  self._on_store, values=True)
            self.gpa = gpa

    def stop(self) -> None:
        if self._hook is not None:
            debugging.remove(self._hook)
            self._hook = None
        self.gpa = None

    def _on_store(self, address: int, size: int, value: int) -> None:
        """A guest store touches the byte (called before it lands: memory still holds the old value)."""
        shift = self.gpa - address
        if shift >= 8:                            # wider than the value Unicorn hands us (SSE): unknown
            return
        m = self.machine
        old, new = m.memory.read_u8(self.gpa), (value >> (8 * shift)) & 0xFF
        if old == new:
            return
        vcpu = m.current_vcpu
        pc = vcpu.pc
        self.write({"cat": "guest", "kind": "upcall-store", "insn": vcpu.instructions_now(), "ns": m.clock.now_ns(),
                    "rip": pc, "old": old, "new": new,
                    "text": f"guest store at {pc:#x}: vCPU0 upcall_pending {old} -> {new}"})

    # -- RFLAGS.IF at block starts --------------------------------------------------------
    def _install_if_watch(self) -> None:
        """From :meth:`before_run` (between runs), once: the engine's block-start check."""
        vcpu0 = self.machine.vcpus[0]
        self._if = int(bool(vcpu0.reg("rflags") & RFLAGS_IF))
        self._if_hook = vcpu0.add_block_check(self._on_block)

    def _on_block(self, address: int) -> None:
        m = self.machine
        vcpu = m.current_vcpu
        if vcpu.index:
            return
        now = int(bool(vcpu.reg("rflags") & RFLAGS_IF))
        if now != self._if:
            self._if = now
            self.write({"cat": "guest", "kind": "if", "insn": vcpu.instructions_now(), "ns": m.clock.now_ns(),
                        "rip": address, "new": now})

    # -- console lines --------------------------------------------------------------------
    def _after_exit(self, vcpu, ex) -> None:
        self.console_lines(vcpu)

    def console_lines(self, vcpu=None) -> None:
        """A ``console`` record for each line the guest completed since the last look."""
        m = self.machine
        data = m.console.data
        if len(data) == self._console_at:
            return
        text = self._partial + bytes(data[self._console_at:])
        self._console_at = len(data)
        *lines, self._partial = text.split(b"\n")
        if not lines:
            return
        vcpu = vcpu or m.current_vcpu
        insn, ns = vcpu.instructions_now(), m.clock.now_ns()
        for line in lines:
            line = line.rstrip(b"\r").decode("utf-8", "replace")[:MAX_LINE]
            if line.strip():
                self.write({"cat": "guest", "kind": "console", "insn": insn, "ns": ns, "text": line})

    def close(self) -> None:
        """The run ended: the last lines (an unfinished one too), and the watch comes out."""
        self.console_lines()
        if self._partial.strip():
            m = self.machine
            self.write({"cat": "guest", "kind": "console", "insn": m.current_vcpu.instructions_now(),
                        "ns": m.clock.now_ns(), "text": self._partial.rstrip().decode("utf-8", "replace")[:MAX_LINE]})
        self._partial = b""
        self.stop()
        m = self.machine
        if self._if_hook is not None:
            m.vcpus[0].remove_block_check(self._if_hook)
            self._if_hook = None
        if self in m.agents:
            m.agents.remove(self)
        if self._after_exit in m.exit_listeners:
            m.exit_listeners.remove(self._after_exit)
