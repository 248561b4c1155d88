"""The local APIC (xAPIC mode, MMIO 0xFEE00000): the CPU's own interrupt unit.

Every interrupt reaches the CPU through its local APIC (Intel SDM vol. 3,
chapter 10). Registers sit at 16-byte strides in a 4 KiB page:

======  ==========  ============================================================
offset  register    meaning
======  ==========  ============================================================
0x020   ID          APIC ID (bits 31:24)
0x030   version     0x14, max LVT entry 5 (bits 23:16)
0x080   TPR         task priority: classes at or below it are held back
0x0A0   PPR         processor priority = max(TPR, class of highest ISR)
0x0B0   EOI         write: the highest in-service vector is done
0x0D0   LDR         logical ID (bits 31:24); 0x0E0 DFR: flat (0xF) or cluster
0x0F0   SVR         spurious vector (7:0), bit 8 APIC software enable,
                    bit 12 suppress EOI broadcast
0x100   ISR[8]      in service (256 bits); 0x180 TMR[8]: level-triggered;
0x200   IRR[8]      requested
0x280   ESR         error status (write to latch, then read)
0x300   ICR         interrupt command (0x310 high: destination): IPIs
0x320   LVT timer   vector, mask (16), mode (18:17: one-shot, periodic,
                    TSC-deadline); 0x350 LINT0, 0x360 LINT1, 0x370 error
0x380   TMICT       initial count; 0x390 TMCCT current count (RO)
0x3E0   TDCR        divide configuration (bits 3, 1:0)
======  ==========  ============================================================

An interrupt is delivered when the highest vector in IRR has a higher
priority class (vector >> 4) than PPR; acknowledging moves it to ISR. The
EOI clears the highest ISR bit and, when TMR says the interrupt was
level-triggered, broadcasts the EOI to the IOAPICs so their Remote IRR
clears. LINT0 in ExtINT mode is the "virtual wire" to the 8259: the PIC's
INT output is then an interrupt whose vector the PIC supplies (QEMU and
SeaBIOS set this up on the boot CPU; so does xenicorn).

The timer counts down from TMICT at the bus clock (1 GHz here, one count
per nanosecond of machine time) divided by TDCR. xenicorn keeps the base
at 0xFEE00000 (Unicorn drops writes to IA32_APIC_BASE) and does not offer
the TSC-deadline mode (CPUID does not advertise it).

Besides the software enable (SVR bit 8), IA32_APIC_BASE bit 11 enables the
APIC *globally* (SDM vol. 3 §10.4.3): cleared, the CPU behaves as one
without an APIC. As Xen's vlapic does (``guest_wrmsr_apic_base``,
``vlapic_range``, ``vlapic_accept_pic_intr``; CPUID in
xen/arch/x86/cpuid.c): the page at 0xFEE00000 is no longer the APIC's (reads
float high, writes go nowhere), no interrupt is accepted or presented, the
8259 included, CPUID.1:EDX.APIC reads 0; setting the bit again resets the
APIC to its power-up state (``vlapic_reset``). NMIs still arrive.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

from ..records import RecordError, boolean, flag, integer, listing, make_record, open_record, timer_refs, timers, uint

LAPIC_BASE = 0xFEE00000
LVT_TIMER, LVT_THERMAL, LVT_PERF, LVT_LINT0, LVT_LINT1, LVT_ERROR = range(6)
LVT_OFFSETS = {0x320: LVT_TIMER, 0x330: LVT_THERMAL, 0x340: LVT_PERF, 0x350: LVT_LINT0,
               0x360: LVT_LINT1, 0x370: LVT_ERROR}
LVT_MASKED = 1 << 16
LVT_NAMES = ("timer", "thermal", "perf", "LINT0", "LINT1", "error")
# Writable bits of each LVT entry (SDM vol. 3 §10.5.1, figure 10-8): all have
# the vector and the mask; the timer its mode (17-18); thermal and perf a
# delivery mode (8-10); LINT0/1 a delivery mode, pin polarity (13) and
# trigger mode (15). Delivery status (12) and remote IRR (14) are read-only.
_DM, _POLARITY, _TRIGGER = 0x700, 1 << 13, 1 << 15
LVT_WRITABLE = {
    LVT_TIMER: 0xFF | LVT_MASKED | (3 << 17),
    LVT_THERMAL: 0xFF | LVT_MASKED | _DM,
    LVT_PERF: 0xFF | LVT_MASKED | _DM,
    LVT_LINT0: 0xFF | LVT_MASKED | _DM | _POLARITY | _TRIGGER,
    LVT_LINT1: 0xFF | LVT_MASKED | _DM | _POLARITY | _TRIGGER,
    LVT_ERROR: 0xFF | LVT_MASKED,
}
DM_FIXED, DM_LOWEST, DM_SMI, DM_NMI, DM_INIT, DM_STARTUP, DM_EXTINT = 0, 1, 2, 4, 5, 6, 7
# ESR bits (SDM vol. 3 §11.5.3): a vector 0-15 is illegal; sending one sets
# bit 5, receiving one (an IPI, a message, the LVT error entry) bit 6.
ESR_SEND_ILLEGAL, ESR_RECV_ILLEGAL = 1 << 5, 1 << 6
SVR_ENABLE, SVR_SUPPRESS_EOI = 1 << 8, 1 << 12


@dataclass
class LapicState:
    """Registers of one local APIC (Xen's ``hvm_hw_lapic_regs``, in fields)."""

    id: int = 0
    tpr: int = 0
    ldr: int = 0
    dfr: int = 0xFFFFFFFF
    svr: int = 0xFF                       # software-disabled, spurious vector 0xFF
    isr: int = 0                          # 256-bit bitmaps
    tmr: int = 0
    irr: int = 0
    esr: int = 0
    esr_pending: int = 0
    icr: int = 0                          # 64 bits: low | high << 32
    lvt: list[int] = field(default_factory=lambda: [LVT_MASKED] * 6)
    initial_count: int = 0
    divide: int = 0
    timer_start_ns: int = 0               # machine time when the count was (re)loaded


def _highest(bits: int) -> int | None:
    return bits.bit_length() - 1 if bits else None


class Lapic:
    """One local APIC. ``notify()`` is called when an interrupt may be deliverable."""

    def __init__(self, clock=None, notify: Callable[[], None] = lambda: None, apic_id: int = 0,
                 pic=None):
        self.state = LapicState(id=apic_id)
        self.state.lvt[LVT_LINT0] = DM_EXTINT << 8          # virtual wire (set by "firmware")
        self.state.lvt[LVT_LINT1] = DM_NMI << 8
        self.clock = clock
        self.notify = notify
        self.pic = pic                                        # the 8259 pair on LINT0
        self.ioapics: list = []                               # EOI broadcast targets
        self.timer = None
        self.timer_fires = 0
        self.nmi_pending = False
        self.hw_enabled = True                                # IA32_APIC_BASE.EN (bit 11)
        self.trace: Callable[[str], None] | None = None
        self.bus = None                                       # the APIC bus (devices/apicbus.py), if any

    # -- priorities ----------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        """Globally (IA32_APIC_BASE) and in software (SVR) enabled: it accepts interrupts."""
        return self.hw_enabled and bool(self.state.svr & SVR_ENABLE)

    def set_hw_enabled(self, on: bool) -> None:
        """IA32_APIC_BASE.EN written: off, the CPU has no APIC; on again, it starts from power-up."""
        if on == self.hw_enabled:
            return
        self.hw_enabled = on
        if on:
            nmi = self.nmi_pending
            self.reset_for_init()                            # vlapic_reset: power-up registers, timer off
            self.nmi_pending = nmi
        if self.trace is not None:
            self.trace(f"LAPIC {self.state.id} globally {'enabled (reset)' if on else 'disabled'}")
        self.notify()

    def ppr(self) -> int:
        st = self.state
        isrv = _highest(st.isr) or 0
        return st.tpr & 0xFF if (st.tpr >> 4) >= (isrv >> 4) else isrv & 0xF0

    def _deliverable(self) -> int | None:
        v = _highest(self.state.irr)
        if v is None or (v >> 4) <= (self.ppr() >> 4):
            return None
        return v

    def _extint(self) -> bool:
        lint0 = self.state.lvt[LVT_LINT0]
        return (self.pic is not None and not lint0 & LVT_MASKED and (lint0 >> 8) & 7 == DM_EXTINT
                and self.pic.pending())

    def pending(self) -> bool:
        return self.hw_enabled and (self._deliverable() is not None or self._extint())

    def vector_pending(self) -> bool:
        """A vector of its own in IRR above the PPR (not the 8259's ExtINT, whose vector comes at INTA)."""
        return self.hw_enabled and self._deliverable() is not None

    def acknowledge(self) -> int | None:
        """The CPU takes an interrupt: IRR → ISR, or the PIC's vector for ExtINT."""
        st = self.state
        if not self.hw_enabled:
            return None
        v = self._deliverable()
        if v is not None:
            ppr = self.ppr()
            st.irr &= ~(1 << v)
            st.isr |= 1 << v
            if self.trace is not None:
                self.trace(f"LAPIC {st.id} takes vector {v:#x} (PPR was {ppr:#x}, "
                           f"{'level' if st.tmr >> v & 1 else 'edge'})")
            return v
        if self._extint():
            if self.trace is not None:
                self.trace(f"LAPIC {st.id} LINT0 ExtINT: asks the 8259 for the vector")
            return self.pic.acknowledge()
        if st.irr:
            return st.svr & 0xFF                             # it vanished below PPR: spurious
        return None

    # -- message input -------------------------------------------------------------
    def accept(self, vector: int, level: bool = False) -> None:
        """A fixed interrupt arrives (from the IOAPIC, an IPI, the timer, Xen)."""
        st = self.state
        if not self.enabled:
            return                                           # a software-disabled APIC drops them
        if vector < 16:
            self.error(ESR_RECV_ILLEGAL)
            return
        st.irr |= 1 << vector
        st.tmr = st.tmr | (1 << vector) if level else st.tmr & ~(1 << vector)
        if self.trace is not None:
            self.trace(f"LAPIC {st.id} IRR gets vector {vector:#x} ({'level' if level else 'edge'})")
        self.notify()

    def error(self, bit: int) -> None:
        """An APIC error: latch ``bit`` for the next ESR write and signal it through LVT error.

        The error interrupt goes out when the bit newly sets (Xen's
        per-bit choice, xen/arch/x86/hvm/vlapic.c ``vlapic_error``; the SDM
        leaves it model specific). An LVT error entry holding an illegal
        vector cannot be delivered: that is itself a receive-illegal-vector
        error, folded in here so the chain ends.
        """
        st = self.state
        if st.esr_pending & bit:
            return
        st.esr_pending |= bit
        lvterr = st.lvt[LVT_ERROR]
        if self.trace is not None:
            self.trace(f"LAPIC {st.id} error: ESR bit {bit.bit_length() - 1}")
        if lvterr & LVT_MASKED:
            return
        if lvterr & 0xFF < 16:
            st.esr_pending |= ESR_RECV_ILLEGAL
        else:
            self.accept(lvterr & 0xFF)

    def raise_nmi(self) -> None:
        """An NMI message: the CPU takes it at its next instruction boundary, IF or not."""
        self.nmi_pending = True
        self.notify()

    def reset_for_init(self) -> None:
        """INIT: every register to its power-up value but the APIC ID (SDM vol. 3 §10.4.7.3)."""
        old = self.state
        if self.clock is not None:
            self.clock.cancel(self.timer)
        self.timer = None
        self.state = LapicState(id=old.id)
        self.nmi_pending = False

    def matches(self, dest: int, logical: bool) -> bool:
        """Is this APIC addressed by ``dest`` in physical or logical (flat/cluster) mode?"""
        st = self.state
        if not logical:
            return dest in (st.id, 0xFF)
        if (st.dfr >> 28) == 0xF:                            # flat model
            return bool((st.ldr >> 24) & dest)
        return (st.ldr >> 28) == (dest >> 4) and bool((st.ldr >> 24) & dest & 0xF)  # cluster

    def deliver(self, dest: int, logical: bool, mode: int, vector: int, level: bool) -> None:
        """An interrupt message (IOAPIC or ICR) addressed by destination."""
        if not self.matches(dest, logical):
            return
        if mode in (DM_FIXED, DM_LOWEST):
            self.accept(vector, level)
        elif mode == DM_NMI:
            self.nmi_pending = True
            self.notify()
        elif mode == DM_EXTINT:
            self.notify()

    # -- EOI --------------------------------------------------------------------
    def eoi(self) -> None:
        st = self.state
        v = _highest(st.isr)
        if v is None:
            return
        st.isr &= ~(1 << v)
        if self.trace is not None:
            self.trace(f"LAPIC {st.id} EOI vector {v:#x}" + (" (level: broadcast to IOAPIC)"
                                                              if st.tmr >> v & 1 else ""))
        if st.tmr >> v & 1 and not st.svr & SVR_SUPPRESS_EOI:
            for io in self.ioapics:
                io.eoi_broadcast(v)
        self.notify()

    # -- timer ------------------------------------------------------------------
    def _divisor(self) -> int:
        d = self.state.divide
        code = (d & 3) | ((d >> 1) & 4)
        return 1 << ((code + 1) & 7)

    def _now(self) -> int:
        return self.clock.now_ns() if self.clock is not None else 0

    def current_count(self) -> int:
        st = self.state
        if not st.initial_count or (self.clock is not None and self.timer is None):
            return 0                                         # stopped, or a one-shot that ran out
        elapsed = (self._now() - st.timer_start_ns) // self._divisor()
        mode = (st.lvt[LVT_TIMER] >> 17) & 3
        if mode == 1:                                        # periodic
            return st.initial_count - elapsed % st.initial_count
        return max(0, st.initial_count - elapsed)

    def _arm(self) -> None:
        if self.clock is None:
            return
        self.clock.cancel(self.timer)
        self.timer = None
        st = self.state
        if not st.initial_count:
            return
        period = st.initial_count * self._divisor()
        deadline = st.timer_start_ns + period
        self.timer = self.clock.add_timer(deadline, self._expire, "lapic-timer")

    def _timer_mode_written(self, before: int, after: int) -> None:
        """The LVT timer entry was written: the timer keeps running as it was, or stops.

        Only a TMICT write starts the count (SDM vol. 3 §11.5.4): a new
        vector or mode takes effect at the next expiry, and a one-shot that
        already ran out stays stopped. Moving into or out of TSC-deadline
        mode stops the timer and clears TMICT, as Xen's ``vlapic_reg_write``
        does for APIC_LVTT (xen/arch/x86/hvm/vlapic.c).
        """
        if ((before >> 17) & 3 == 2) != ((after >> 17) & 3 == 2):
            self.state.initial_count = 0
            self._arm()                                      # cancels

    def _expire(self) -> None:
        st = self.state
        self.timer = None
        self.timer_fires += 1
        lvt = st.lvt[LVT_TIMER]
        if not lvt & LVT_MASKED:
            if st.irr >> (lvt & 0xFF) & 1 and self.trace is not None:
                self.trace(f"LAPIC {st.id} timer fires: vector {lvt & 0xFF:#x} already in IRR (coalesced)")
            self.accept(lvt & 0xFF)
        if (lvt >> 17) & 3 == 1 and st.initial_count:        # periodic: reload
            st.timer_start_ns += st.initial_count * self._divisor()
            self._arm()

    # -- registers ----------------------------------------------------------------
    def mmio_read(self, offset: int, size: int) -> int:
        st = self.state
        if not self.hw_enabled:
            return (1 << (8 * size)) - 1                     # not the APIC's page: floats high
        reg = offset & 0xFF0
        if reg == 0x020:
            return st.id << 24
        if reg == 0x030:
            return 0x00050014
        if reg == 0x080:
            return st.tpr
        if reg == 0x090:
            return 0                                         # APR: arbitration, unused
        if reg == 0x0A0:
            return self.ppr()
        if reg == 0x0D0:
            return st.ldr
        if reg == 0x0E0:
            return st.dfr
        if reg == 0x0F0:
            return st.svr
        for base, bits in ((0x100, st.isr), (0x180, st.tmr), (0x200, st.irr)):
            if base <= reg < base + 0x80:
                return (bits >> (32 * ((reg - base) >> 4))) & 0xFFFFFFFF
        if reg == 0x280:
            return st.esr
        if reg == 0x300:
            return st.icr & 0xFFFFFFFF & ~(1 << 12)          # delivery status: always idle
        if reg == 0x310:
            return st.icr >> 32
        if reg in LVT_OFFSETS:
            return st.lvt[LVT_OFFSETS[reg]]
        if reg == 0x380:
            return st.initial_count
        if reg == 0x390:
            return self.current_count()
        if reg == 0x3E0:
            return st.divide
        return 0

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        st = self.state
        if not self.hw_enabled:
            return                                           # not the APIC's page
        reg = offset & 0xFF0
        value &= 0xFFFFFFFF
        if reg == 0x020:
            st.id = value >> 24
        elif reg == 0x080:
            st.tpr = value & 0xFF
            self.notify()
        elif reg == 0x0B0:
            self.eoi()
        elif reg == 0x0D0:
            st.ldr = value & 0xFF000000
        elif reg == 0x0E0:
            st.dfr = value | 0x0FFFFFFF
        elif reg == 0x0F0:
            st.svr = value & 0x11FF
            if not st.svr & SVR_ENABLE:
                st.lvt = [v | LVT_MASKED for v in st.lvt]    # SDM §10.4.7.2
            self.notify()
        elif reg == 0x280:
            st.esr, st.esr_pending = st.esr_pending, 0
        elif reg == 0x300:
            st.icr = (st.icr & ~0xFFFFFFFF) | value
            self._send_ipi()
        elif reg == 0x310:
            st.icr = (st.icr & 0xFFFFFFFF) | (value << 32)
        elif reg in LVT_OFFSETS:
            idx = LVT_OFFSETS[reg]
            if not self.enabled:
                value |= LVT_MASKED
            before, st.lvt[idx] = st.lvt[idx], value & LVT_WRITABLE[idx]
            if idx == LVT_TIMER:
                self._timer_mode_written(before, st.lvt[idx])
            self.notify()
        elif reg == 0x380:
            st.initial_count = value
            st.timer_start_ns = self._now()
            self._arm()
        elif reg == 0x3E0:
            st.divide = value & 0xB

    def _send_ipi(self) -> None:
        """ICR low was written: the IPI goes out on the APIC bus, or to ourselves without one."""
        st = self.state
        if self.bus is not None:
            self.bus.ipi(self, st.icr)
            return
        low = st.icr & 0xFFFFFFFF
        mode, vector, shorthand = (low >> 8) & 7, low & 0xFF, (low >> 18) & 3
        if mode in (DM_FIXED, DM_LOWEST) and vector < 16:
            self.error(ESR_SEND_ILLEGAL)                     # never sent (vlapic_ipi)
            return
        if shorthand == 3:                                   # all excluding self
            return
        if shorthand in (1, 2) or self.matches(st.icr >> 56, bool(low & (1 << 11))):
            if mode == DM_FIXED:
                self.accept(vector, False)
            elif mode == DM_NMI:
                self.nmi_pending = True
                self.notify()
            # INIT and STARTUP need more CPUs: ignored on a uniprocessor

    # -- snapshots (a record, see xenicorn.records) -----------------------------------
    RECORD = ("lapic", 1)
    REGISTERS = ("id", "tpr", "ldr", "dfr", "svr", "isr", "tmr", "irr", "esr", "esr_pending", "icr",
                 "initial_count", "divide", "timer_start_ns")

    def save(self) -> dict:
        """The registers (a copy)."""
        st = self.state
        d = {k: getattr(st, k) for k in self.REGISTERS}
        d["lvt"] = list(st.lvt)
        return d

    def restore(self, data: dict) -> None:
        """Load :meth:`save`'s output, validated; the timer starts again from the registers."""
        prepared = self.check_record(make_record(*self.RECORD, {**data, "nmi_pending": self.nmi_pending,
                                                                "hw_enabled": self.hw_enabled,
                                                                "timer_fires": self.timer_fires, "timers": {}}))
        self.apply_record(prepared)
        self._arm()
        self.notify()

    def save_record(self) -> dict:
        return make_record(*self.RECORD, {**self.save(), "nmi_pending": self.nmi_pending,
                                          "hw_enabled": self.hw_enabled, "timer_fires": self.timer_fires,
                                          "timers": timer_refs(self.clock, {"lapic-timer": self.timer})})

    def check_record(self, record: dict):
        """Registers only as the register writes leave them (what Xen's ``lapic_check_regs`` guards).

        Each LVT entry holds only its writable bits (SDM vol. 3 §10.5.1:
        delivery status and remote IRR are read-only, the rest reserved);
        vectors 0-15 are never requested or in service (they are illegal,
        §10.5.3); LDR keeps bits 31:24, DFR's bits 27:0 read as ones, SVR
        has bits 12, 8 and 7:0, TDCR bits 3 and 1:0, ESR eight bits.
        """
        st = open_record(record, *self.RECORD)
        lvt = listing(st, "lvt", 6)
        if len(lvt) != 6:
            raise RecordError(f"LAPIC with {len(lvt)} LVT entries, this one has 6")
        for idx, entry in enumerate(lvt):
            integer(entry, f"LVT entry {idx}", 0, 0xFFFFFFFF)
            if entry & ~LVT_WRITABLE[idx]:
                raise RecordError(f"LAPIC LVT entry {LVT_NAMES[idx]} {entry:#x} sets reserved or read-only "
                                  f"bits {entry & ~LVT_WRITABLE[idx]:#x}")
        regs = {"id": uint(st, "id", 8), "tpr": uint(st, "tpr", 8), "ldr": uint(st, "ldr", 32, reserved=0x00FFFFFF),
                "svr": uint(st, "svr", 32, reserved=~0x11FF), "esr": uint(st, "esr", 8),
                "esr_pending": uint(st, "esr_pending", 8), "icr": uint(st, "icr", 64),
                "initial_count": uint(st, "initial_count", 32), "divide": uint(st, "divide", 32, reserved=~0xB),
                "timer_start_ns": uint(st, "timer_start_ns", 63)}
        regs.update({k: uint(st, k, 256, reserved=0xFFFF) for k in ("isr", "tmr", "irr")})
        dfr = uint(st, "dfr", 32)
        if dfr & 0x0FFFFFFF != 0x0FFFFFFF:
            raise RecordError(f"LAPIC DFR {dfr:#x}: bits 27:0 read as ones")
        armed = timers(st, ("lapic-timer",))
        if armed and not regs["initial_count"]:
            raise RecordError("LAPIC timer armed with an initial count of 0")
        hw_enabled = boolean(st.get("hw_enabled", True), "hw_enabled")      # absent in older records: on
        return (LapicState(**regs, dfr=dfr, lvt=list(lvt)), flag(st, "nmi_pending"), uint(st, "timer_fires"),
                armed.get("lapic-timer"), hw_enabled)

    def apply_record(self, prepared) -> None:
        """Install the registers and re-arm the timer at its saved deadline (after the clock's record)."""
        state, self.nmi_pending, self.timer_fires, timer, self.hw_enabled = prepared
        self.state = replace(state, lvt=list(state.lvt))
        if self.clock is not None:
            self.clock.cancel(self.timer)
            self.timer = self.clock.rearm(timer, self._expire, "lapic-timer")
