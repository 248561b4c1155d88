"""The human monitor's ``info`` commands (debug/hmp_info.py) against the state a guest left."""
import re

from test_firmware import run
from xenicorn.debug import hmp_info as H


def test_info_pic_ioapic_lapic_irq_after_the_gsi_callback():
    """evtchn64 via=gsi: the callback is IOAPIC pin 20, level, and QEMU's layout shows it."""
    m, _, status, text = run("evtchn64", cmdline="via=gsi")
    assert status == 0 and "Test result: SUCCESS" in text
    rte = m.ioapic.state.redirtbl[20]
    vec = rte & 0xFF
    pic = H.pic(m).splitlines()
    st = m.pic.master.state
    assert pic[0] == (f"pic0: irr={st.irr:02x} imr={st.imr:02x} isr={st.isr:02x} hprio={st.priority_add} "
                      f"irq_base=20 rr_sel=0 elcr={st.elcr:02x} fnm=0")
    assert pic[1].startswith("pic1: ") and "irq_base=28" in pic[1]
    assert pic[2].startswith("ioapic0: ver=0x20 id=0x01 ")                 # info pic ends with the IOAPIC
    ioapic = H.ioapic(m).splitlines()
    assert len(ioapic) == 1 + len(m.ioapic.state.redirtbl) + 2
    assert ioapic[1 + 20] == f"  pin 20 {rte:#018x} dest=0 vec={vec:<3d} active-hi level        fixed  physical"
    assert ioapic[1 + 0].endswith("edge  masked fixed  physical")
    remote = [p for p, r in enumerate(m.ioapic.state.redirtbl) if r & (1 << 14) and r & (1 << 15)]
    assert ioapic[-1] == "  Remote IRR " + "".join(f"{p:<2d} " for p in remote) if remote else "  Remote IRR (none)"
    lapic = H.lapic(m, 0).splitlines()
    assert lapic[0] == "dumping local APIC state for CPU 0 "
    assert lapic[2].startswith("LVT0\t 0x00000700 active-hi edge") and lapic[2].endswith("ExtINT (vec 0)")
    assert lapic[3].rstrip().endswith("NMI")                                 # no vector for NMI
    assert lapic[9] == "SPIV\t 0x000001ff APIC enabled, focus=off, spurious vec 255"
    irr = [v for v in range(256) if m.lapic.state.irr >> v & 1]
    tmr = m.lapic.state.tmr
    assert lapic[14] == "IRR\t " + ("".join(f"{v}{'(level)' if tmr >> v & 1 else ''} " for v in irr) or "(none)")
    assert re.fullmatch(r"APR 0x00 TPR 0x00 DFR 0x0f LDR 0x.. PPR 0x..", lapic[-1])
    # every rise of the callback line was counted on pin 20, none on pins nobody drives
    irq = H.irq(m).splitlines()
    assert irq[0] == "IRQ statistics for isa-i8259:"
    assert f"20: {m.ioapic.irq_count[20]}" in irq and m.ioapic.irq_count[20] >= 2
    assert sum(m.ioapic.irq_count) == sum(int(line.split(": ")[1]) for line in irq[irq.index(
        "IRQ statistics for ioapic:") + 1:])


def test_info_registers_of_the_current_and_of_another_vcpu():
    m, k, status, text = run("smp64", smp=2)
    assert status == 0 and "Test result: SUCCESS" in text
    for cpu in (0, 1):
        regs = H.registers(m, cpu).splitlines()
        v = m.vcpus[cpu]
        assert regs[0].startswith(f"RAX={v.reg('rax'):016x} RBX={v.reg('rbx'):016x}")
        assert regs[4].startswith(f"RIP={v.pc:016x} RFL={v.reg('rflags'):08x} [")
        assert "CPL=0 II=0 A20=1 SMM=0" in regs[4]
        assert re.fullmatch(r"CS =0010 0{16} ffffffff 00af9a00 DPL=0 CS64 \[-R-\]", regs[6])
        assert regs[13].startswith("GDT=     ") and regs[15].startswith(f"CR0={v.reg('cr0'):08x} ")
    assert H.registers(m, 0).splitlines()[-1].startswith("EFER=0000000000000")   # LME|LMA set
    assert H.lapic(m, 1).startswith("dumping local APIC state for CPU 1 ")


def test_info_evtchn_lists_ports_bits_and_fifo_priorities():
    m, _, status, text = run("fifo64", cmdline="via=vector")
    assert status == 0 and "Test result: SUCCESS" in text
    lines = H.evtchn(m).splitlines()
    assert lines[0] == "event channel ABI: FIFO"
    assert lines[1] == " port type         vcpu remote target pending masked"
    events = m.xen.evtchn.event_list()
    assert len(lines) == 2 + len(events)
    for e, line in zip(events, lines[2:], strict=True):
        assert line.split()[:2] == [str(e["port"]), e["type"]]
        assert f"priority {e['priority']}" in line
        assert ("yes" if e["pending"] else "no") in line.split()[4:6]
    m2, _, _, _ = run("evtchn64", cmdline="via=vector")
    assert H.evtchn(m2).splitlines()[0] == "event channel ABI: 2-level"
