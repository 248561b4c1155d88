"""Which components make up a machine snapshot, and in which order a load applies them.

Each component saves and restores itself (:mod:`xenicorn.records`); this
list only names them by their place in the machine. The order matters for
``apply_record`` only:

1. the clock first: it drops every timer, and each owner re-arms its own;
2. guest memory (hypervisor frames, then RAM), then the PCI bus, whose
   BARs map MMIO ranges into every vCPU;
3. the vCPUs, after RAM and the BARs: they flush translated code and TLBs;
4. the devices, then the Xen layer (which writes time records through a
   vCPU's page tables, and makes the callback's sub-lines);
5. the machine's wiring last: it sets every line's level and each shared
   line's sources, including those the callback just made.
"""
from __future__ import annotations

from ..devices.console import AcpiPmControl, AcpiPmEvent
from ..engine.vcpustate import VcpuRecord
from ..machine.wiringstate import WiringRecord


def components(machine) -> list[tuple[str, object]]:
    """``(name, component)`` for every part of ``machine``, in apply order."""
    m = machine
    parts: list[tuple[str, object]] = [("clock", m.clock), ("memory", m.memory), ("pci", m.pci)]
    parts += [(f"vcpu{v.index}", VcpuRecord(v)) for v in m.vcpus]
    parts += [("pic", m.pic), ("ioapic", m.ioapic), ("lapic", m.lapic)]
    parts += [(f"lapic{i}", lapic) for i, lapic in enumerate(m.lapics) if i]    # the APs' own
    parts += [("pit", m.pit), ("rtc", m.rtc), ("fw-cfg", m.fw_cfg)]
    if m.hpet is not None:
        parts.append(("hpet", m.hpet))
    if getattr(m, "testdev", None) is not None:
        parts.append(("pc-testdev", m.testdev))
    if m.serial is not None:
        parts.append(("uart", m.serial))
    for name, port, kind in (("acpi-pm1-event", AcpiPmEvent.PORT, AcpiPmEvent),
                             ("acpi-pm1-control", AcpiPmControl.PORT, AcpiPmControl)):
        hit = m.pio.lookup(port)
        if hit is not None and isinstance(hit[1], kind):
            parts.append((name, hit[1]))
    parts += [("pio", m.pio), ("mmio", m.mmio)]
    if m.xen is not None:
        from ..xen.savestate import components as xen_components
        parts += xen_components(m.xen)
    parts.append(("machine", WiringRecord(m)))
    return parts
