"""The platform's part of a snapshot: vCPU, memory map, clock, devices, lines.

Each ``save_*`` returns JSON-able data; each ``prepare_*`` parses and checks
it completely and returns an ``apply()`` that installs it *silently*: device
registers, line levels and each shared line's sources are all saved, so they
are put back as they were instead of being re-driven (re-driving a restored
level into a restored IOAPIC would deliver an interrupt a second time).
Timers come back last, from each owner's saved ``[deadline, seq]``.
"""
from __future__ import annotations

import ctypes
from dataclasses import asdict

from ..devices.i8259 import PicState
from ..devices.ioapic import NUM_PINS, IoapicState
from ..devices.irq import IrqLine, SharedLine
from ..devices.lapic import LapicState
from ..devices.pit8254 import CounterState
from ..devices.uart16550 import UartState
from ..devices.xen_platform import XenPlatformState
from ..machine.clock import timer_ref
from ..machine.memory import PAGE_SIZE, E820Entry
from ..engine.msr import SHADOW_BASE
from ..engine.rawctx import RawContext

CTX_HEADER = 40


# -- vCPU -----------------------------------------------------------------------------
# Host pointers inside CPUX86State (unicorn 2.1.4): cpu_breakpoint[4] (QEMU's
# objects for DR0-3 breakpoints) and retaddr (the TCG return address an SVM
# intercept helper unwinds with, left behind after each use). They mean
# nothing in another process, so a snapshot stores zeros there.
HOST_POINTERS = ((5464, 32), (5560, 8))


def context_bytes(uc) -> bytes:
    """CPUX86State as Unicorn saves it (without uc_context's own header), host pointers zeroed.

    Restoring these bytes into a fresh engine reproduces registers, segment
    caches, hflags, EFER and the other MSRs, FPU and SSE, and the MSR/RDTSC
    intercept fields (docs/unicorn-notes.md).
    """
    ctx = RawContext(uc)
    raw = bytearray(ctx._mem[:ctx.ctx.size - CTX_HEADER])
    for off, size in HOST_POINTERS:
        raw[off:off + size] = bytes(size)
    return bytes(raw)


def context_into(uc, blob: bytes) -> None:
    ctx = uc.context_save()
    ptr = ctypes.cast(ctx.context, ctypes.c_void_p).value + CTX_HEADER
    ctypes.memmove(ptr, blob, len(blob))
    uc.context_restore(ctx)


def msr_shadow(vcpu) -> bytes:
    """The VMCB and MSR permission map pages of the MSR window (outside guest RAM)."""
    return bytes(vcpu.uc.mem_read(SHADOW_BASE, 0x3000))


def save_vcpu(v) -> dict:
    """What Python keeps about a vCPU beside Unicorn's context."""
    return {"index": v.index, "instructions": v.instructions, "halted": v.halted, "sleep_kind": v.sleep_kind,
            "mmio_pages": sorted(v._mmio_pages),
            "msr": {"interests": sorted(v.msr.interests), "extra": v.msr.extra, "exits": v.msr.exits},
            "window_exits": v.window_exits}


# -- devices and the machine -------------------------------------------------------------
def _device_on(bus, addr: int):
    hit = bus.lookup(addr)
    return hit[1] if hit is not None else None


def save_platform(machine) -> dict:
    m = machine
    pit = m.pit
    out = {
        "clock": m.clock.save_state(),
        "memory": {"frames": [[i, gpa] for i, gpa in m.memory.frames.items()],
                   "reserved": [[e.addr, e.size, e.type] for e in m.memory.reserved]},
        "machine": {"exit_counts": dict(m.exit_counts), "pirq_pic": list(m.wiring.pirq_pic),
                    "pirq_level": list(m.wiring.pirq_level),
                    "unclaimed_reported": {"pio": sorted(m.pio._reported), "mmio": sorted(m.mmio._reported)}},
        "pic": {"master": asdict(m.pic.master.state), "slave": asdict(m.pic.slave.state),
                "int_levels": [m.pic.master.int_level, m.pic.slave.int_level, m.pic.int_level]},
        "ioapic": {**m.ioapic.save(), "deliveries": m.ioapic.deliveries},
        "lapic": {**m.lapic.save(), "nmi_pending": m.lapic.nmi_pending, "timer_fires": m.lapic.timer_fires,
                  "timer": timer_ref(m.lapic.timer)},
        "pit": {"counters": [{**vars(c.state), "last_edge_ns": c.last_edge_ns, "timer": timer_ref(c.timer)}
                             for c in pit.counters],
                "speaker": pit.speaker, "irq_edges": pit.irq_edges, "toggle": pit.speaker_port.toggle},
        "pci": {"address": m.pci.address, "pirq_levels": list(m.pci.pirq_levels),
                "extra_intx": [[d, p, lv] for (d, p), lv in m.pci.extra_intx.items()],
                "functions": [[devfn, f.save()] for devfn, f in m.pci.functions.items()]},
        "lines": save_lines(m),
    }
    if m.xen_platform is not None:
        out["xen_platform"] = asdict(m.xen_platform.platform_state)
    if m.serial is not None:
        out["uart"] = {**m.serial.save(), "level": m.serial._level}
    acpi = _device_on(m.pio, 0x604)
    if acpi is not None:
        out["acpi_pm"] = acpi.value
    pm_event = _device_on(m.pio, 0x600)
    if pm_event is not None:
        out["acpi_pm_enable"] = pm_event.enable
    out["rtc"] = m.rtc.save()
    return out


def prepare_platform(machine, st: dict, blobs: dict):
    """Parse the platform state; the returned apply() installs it (timers excepted)."""
    m = machine
    p = st
    vcpus = [(v, blobs[f"vcpu{v.index}.context"], blobs[f"vcpu{v.index}.msr-shadow"], d)
             for v, d in zip(m.vcpus, st["vcpus"])]
    for _, _, _, d in vcpus:
        if d["sleep_kind"] not in ("", "HLT", "SCHEDOP_block", "SCHEDOP_poll"):
            raise ValueError(f"vCPU sleep kind {d['sleep_kind']!r}")
        if any(int(pg) % PAGE_SIZE for pg in d["mmio_pages"]):
            raise ValueError("MMIO page not page aligned")
    frames = {int(i): int(g) for i, g in p["memory"]["frames"]}
    for i, g in frames.items():
        if not 0 <= i < 256 or g % PAGE_SIZE:
            raise ValueError(f"hypervisor frame {i} at {g:#x}")
    reserved = [E820Entry(int(a), int(s), int(t)) for a, s, t in p["memory"]["reserved"]]
    pic = [PicState(**p["pic"][name]) for name in ("master", "slave")]
    pic_levels = [bool(x) for x in p["pic"]["int_levels"]]
    lap = p["lapic"]
    lvt = [int(x) for x in lap["lvt"]]
    if len(lvt) != 6:
        raise ValueError("LAPIC LVT")
    lapic = LapicState(**{k: int(v) for k, v in lap.items()
                          if k in LapicState.__dataclass_fields__ and k != "lvt"}, lvt=lvt)
    io = p["ioapic"]
    ioapic = IoapicState(int(io["id"]) & 0x0F, int(io["ioregsel"]) & 0xFF, [int(x) for x in io["redirtbl"]],
                         int(io["irr"]) & ((1 << NUM_PINS) - 1))
    if len(ioapic.redirtbl) != NUM_PINS or any(not 0 <= x < 1 << 64 for x in ioapic.redirtbl):
        raise ValueError("IOAPIC redirection table")
    counters = []
    for c in p["pit"]["counters"]:
        cs = CounterState(**{k: v for k, v in c.items() if k in CounterState.__dataclass_fields__})
        if not 1 <= cs.count <= 0x10000 or not 0 <= cs.mode <= 5:
            raise ValueError("PIT counter")
        counters.append((cs, int(c["last_edge_ns"])))
    if len(counters) != 3:
        raise ValueError("PIT counters")
    uart = None
    if m.serial is not None:
        u = p["uart"]
        rx = [int(b) for b in u["rx"]]
        if len(rx) > 16 or any(not 0 <= b <= 255 for b in rx):
            raise ValueError("UART receive FIFO")
        from collections import deque
        uart = (UartState(**{k: int(u[k]) for k in ("ier", "lcr", "mcr", "lsr", "msr", "scr", "dll", "dlm", "fcr")},
                          thr_ipending=bool(u["thr_ipending"]), rx=deque(rx)), bool(u["level"]))
    pci = p["pci"]
    configs = {}
    for devfn, f in pci["functions"]:
        dev = m.pci.functions.get(int(devfn))
        raw = bytes.fromhex(f["config"])
        if dev is None or len(raw) != 256 or raw[0:4] != bytes(dev.state.config[0:4]):
            raise ValueError(f"PCI function {devfn} is another device")
        configs[int(devfn)] = (dev, raw, bool(f["intx_level"]))
    if set(configs) != set(m.pci.functions):
        raise ValueError("PCI functions differ")
    xp = XenPlatformState(**p["xen_platform"]) if m.xen_platform is not None else None
    rtc = p.get("rtc")
    if rtc is not None:
        from ..devices.rtc import Rtc
        Rtc(m.clock.now_ns).restore(rtc)          # refuses a bad image before anything changes
    mc = p["machine"]

    def apply() -> None:
        m.clock.load_state(p["clock"])
        mem = m.memory
        for index in [i for i in mem.frames if i not in frames]:
            mem.unmap_frame(index)
        for index, gpa in frames.items():
            mem.map_frame(index, gpa)
        mem.reserved = reserved
        for dev, raw, intx in configs.values():
            dev.state.config[:] = raw
            dev.state.intx_level = intx
        for dev, _, _ in configs.values():
            m.pci.map_bars(dev)                 # BARs where the guest put them
        m.pci.address = int(pci["address"])
        m.pci.pirq_levels = [bool(x) for x in pci["pirq_levels"]]
        m.pci.extra_intx = {(int(d), int(pn)): bool(lv) for d, pn, lv in pci["extra_intx"]}
        mem.buf[:] = blobs["memory"]
        for v, ctx, shadow, d in vcpus:
            missing = sorted(int(pg) for pg in d["mmio_pages"] if int(pg) not in v._mmio_pages)
            start = prev = None
            for page in missing + [None]:         # one mapping per run of pages, as the machine made them
                if page is not None and prev is not None and page == prev + PAGE_SIZE:
                    prev = page
                    continue
                if start is not None:
                    v.map_mmio(start, prev + PAGE_SIZE - start)
                start = prev = page
            v.disarm_interrupt_window()
            context_into(v.uc, ctx)
            v.uc.mem_write(SHADOW_BASE, shadow)
            v.instructions = int(d["instructions"])
            v.halted, v.sleep_kind = bool(d["halted"]), d["sleep_kind"]
            v.msr.interests = set(d["msr"]["interests"])
            v.msr.extra, v.msr.exits = int(d["msr"]["extra"]), int(d["msr"]["exits"])
            v.window_exits = int(d.get("window_exits", 0))
            v.msr.reassert()        # the saved context may hold an armed window's intercept
        m.exit_counts = dict(mc["exit_counts"])
        m.wiring.pirq_pic = [None if x is None else int(x) for x in mc["pirq_pic"]]
        m.wiring.pirq_level = [bool(x) for x in mc["pirq_level"]]
        m.pio._reported = set(mc["unclaimed_reported"]["pio"])
        m.mmio._reported = set(mc["unclaimed_reported"]["mmio"])
        m.pic.master.state, m.pic.slave.state = pic
        m.pic.master.int_level, m.pic.slave.int_level, m.pic.int_level = pic_levels
        m.ioapic.state = ioapic
        m.ioapic.deliveries = int(io["deliveries"])
        m.lapic.state = lapic
        m.lapic.nmi_pending, m.lapic.timer_fires = bool(lap["nmi_pending"]), int(lap["timer_fires"])
        for c, (cs, edge) in zip(m.pit.counters, counters):
            c.state, c.last_edge_ns = cs, edge
        m.pit.speaker, m.pit.irq_edges = int(p["pit"]["speaker"]) & 3, int(p["pit"]["irq_edges"])
        m.pit.speaker_port.toggle = bool(p["pit"]["toggle"])
        if uart is not None:
            m.serial.state, m.serial._level = uart
        if xp is not None:
            m.xen_platform.platform_state = xp
        acpi = _device_on(m.pio, 0x604)
        if acpi is not None and "acpi_pm" in p:
            acpi.value = int(p["acpi_pm"])
        pm_event = _device_on(m.pio, 0x600)
        if pm_event is not None and "acpi_pm_enable" in p:
            pm_event.enable = int(p["acpi_pm_enable"]) & 0xFFFF
        if rtc is not None:
            m.rtc.restore(rtc)
    return apply


def prepare_timers(machine, st: dict):
    """Re-arm the device timers with their saved deadlines and sequence numbers."""
    m = machine
    lap_ref = st["lapic"]["timer"]
    pit_refs = [c["timer"] for c in st["pit"]["counters"]]

    def apply() -> None:
        m.lapic.timer = m.clock.rearm(lap_ref, m.lapic._expire, "lapic-timer")
        for c, ref in zip(m.pit.counters, pit_refs):
            c.timer = None
            if ref is not None and c.index == 0:
                when = int(ref[0])
                c.timer = m.clock.rearm(ref, lambda when=when: m.pit._irq0_edge(when), "pit")
    return apply


# -- interrupt lines ----------------------------------------------------------------------
def all_lines(machine) -> dict[str, IrqLine]:
    """Every reachable interrupt line and sub-line, by name.

    A shared line's sub-lines are held by their drivers (the ISA IRQ lines'
    sinks, the PIRQ and 8259-input tables, Xen's callback); each keeps its
    own level, which must agree with the shared line's record of it.
    """
    m = machine
    lines: dict[str, IrqLine] = {}
    for line in list(m.gsi) + list(m.pic_inputs) + list(m.isa_irq):
        lines[line.name] = line
    subs = list(m.wiring.pirq_gsi) + list(m.wiring.pic_sources.values())
    for line in m.isa_irq:
        subs += [s.__self__ for s in line.sinks if isinstance(getattr(s, "__self__", None), IrqLine)]
    if m.xen is not None:
        subs += list(m.xen.callback._sources)
    for line in subs:
        lines[line.name] = line
    return lines


def save_lines(machine) -> dict:
    out = {}
    for name, line in all_lines(machine).items():
        d = {"level": line.level, "edges": line.edges}
        if isinstance(line, SharedLine):
            d["sources"] = dict(line.sources)
        out[name] = d
    return out


def prepare_lines(machine, data: dict):
    parsed = {str(n): (bool(d["level"]), int(d["edges"]),
                       {str(k): bool(v) for k, v in d["sources"].items()} if "sources" in d else None)
              for n, d in data.items()}

    def apply() -> None:
        for name in parsed:                 # 8259 inputs a source was wired to (Xen's callback GSI < 16)
            irq, arrow, source = name.partition("<-")
            if arrow and irq.startswith("PIC") and irq[3:].isdigit() and int(irq[3:]) < 16:
                machine.pic_input(int(irq[3:]), source)
            elif arrow and irq.startswith("GSI") and source.startswith("pirq") and irq[3:].isdigit() \
                    and 0 < int(irq[3:]) < 16:
                machine._isa_gsi_input(int(irq[3:]), source)     # a PIRQ the PIIX3 routed to that IRQ
        for name, line in all_lines(machine).items():       # after Xen's callback made its sources
            if name not in parsed:
                line.level = False
                continue
            level, edges, sources = parsed[name]
            line.level, line.edges = level, edges
            if isinstance(line, SharedLine) and sources is not None:
                line.sources = sources
    return apply
