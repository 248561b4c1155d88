"""QEMU's pc-testdev (kvm-unit-tests' test device) and a self-NMI taken at once.

Both were found by running kvm-unit-tests (tools/kut_census.py): the ioapic
test drives IRQ 14 through the device's line ports, eventinj sends itself an
NMI through the ICR and expects it before its next instruction, as QEMU TCG
delivers it.
"""
import struct

import pytest
from unicorn import x86_const as X

from xenicorn.devices.console import ConsoleSink
from xenicorn.machine.machine import Machine, MachineConfig
from xenicorn.engine.rawctx import RawContext
from xenicorn.x86.segments import SegmentCache, DESC_P

GDT, IDT, TSS, ENTRY, HANDLERS = 0x1000, 0x2000, 0x3000, 0x100000, 0x400000
CODE32 = 0x00CF9A000000FFFF
DATA32 = 0x00CF92000000FFFF


@pytest.fixture
def tmachine():
    m = Machine(MachineConfig(ram_mib=16, debugcon="none", testdev=True), console=ConsoleSink(None))
    yield m
    m.close()


def port(machine, p):
    hit = machine.pio.lookup(p)
    assert hit is not None, f"port {p:#x} unclaimed"
    base, dev = hit
    return base, dev


def test_scratch_register_keeps_what_any_width_wrote(tmachine):
    base, dev = port(tmachine, 0xE0)
    dev.pio_write(0xE0 - base, 4, 0x11223344)
    assert dev.pio_read(0, 4) == 0x11223344
    dev.pio_write(2, 1, 0xAB)                        # byte 2 only (QEMU's mask at start_bit 16)
    assert dev.pio_read(0, 4) == 0x11AB3344
    assert dev.pio_read(1, 2) == 0xAB33
    assert dev.pio_read(2, 4) == 0x11AB               # past byte 3 reads 0, as QEMU's shift gives
    dev.pio_write(3, 2, 0xFFEE)                       # the byte beyond the register is dropped
    assert dev.pio_read(0, 4) == 0xEEAB3344


def test_snapshot_record_round_trip_and_bad_value_refused(tmachine):
    from xenicorn.records import RecordError
    _, dev = port(tmachine, 0xE0)
    dev.pio_write(0, 4, 0xCAFEF00D)
    rec = dev.save_record()
    dev.pio_write(0, 4, 0)
    dev.apply_record(dev.check_record(rec))
    assert dev.pio_read(0, 4) == 0xCAFEF00D
    rec["state"]["data"] = 1 << 32
    with pytest.raises(RecordError):
        dev.check_record(rec)


def test_irq_line_ports_drive_isa_irqs_to_pic_and_ioapic(tmachine):
    base, lines = port(tmachine, 0x2000)
    assert base == 0x2000
    lines.pio_write(14, 1, 1)
    assert tmachine.isa_irq[14].level and tmachine.gsi[14].level
    assert tmachine.pic_inputs[14].level
    lines.pio_write(14, 1, 0)
    assert not tmachine.isa_irq[14].level and not tmachine.gsi[14].level
    lines.pio_write(0, 1, 7)                          # IRQ 0 reaches IOAPIC pin 2 (the ISO)
    assert tmachine.gsi[2].level
    lines.pio_write(0, 1, 0)
    # lines 16-23 (QEMU asserts there) and wide writes are ignored
    lines.pio_write(20, 1, 1)
    lines.pio_write(14, 2, 1)
    assert not tmachine.gsi[20].level and not tmachine.isa_irq[14].level


def test_flush_page_port_accepts_writes(tmachine):
    base, dev = port(tmachine, 0xE4)
    dev.pio_write(0xE4 - base, 4, 0x123000)           # nothing observable happens, nothing breaks
    assert dev.pio_read(0, 4) == 0xFFFFFFFF


def test_without_the_option_the_ports_are_unclaimed(machine):
    assert machine.pio.lookup(0xE0) is None and machine.pio.lookup(0x2000) is None


def _protected_with_idt(machine):
    """Flat 32-bit protected mode; vector v's handler at HANDLERS + 16 v."""
    vcpu, mem = machine.vcpu, machine.memory
    vcpu.reset_to_flat32(ENTRY, esp=0x8000)
    mem.write(GDT, struct.pack("<6Q", 0, CODE32, DATA32, 0, 0, 0))
    vcpu.uc.reg_write(X.UC_X86_REG_GDTR, (0, GDT, 6 * 8 - 1, 0))
    vcpu.uc.reg_write(X.UC_X86_REG_IDTR, (0, IDT, 256 * 8 - 1, 0))
    with RawContext(vcpu.uc) as ctx:
        ctx.set_segment("tr", SegmentCache(0x28, TSS, 0x67, DESC_P | (0xB << 8)))
    for v in range(256):
        off = HANDLERS + 16 * v
        mem.write(IDT + 8 * v, struct.pack("<HHBBH", off & 0xFFFF, 0x08, 0, 0x8E, off >> 16))


def _load(machine, addr, code):
    machine.memory.write(addr, code)
    machine.memory.code_written(addr, len(code))


def test_self_nmi_through_the_icr_is_taken_at_once(machine):
    """An NMI IPI to self (SDM vol. 3 §10.6.1) needs no IF and no EOI: QEMU
    TCG takes it when the block of translated code that wrote the ICR ends
    (``cpu_interrupt`` is checked at each block's start). The guest writes
    the ICR, jumps (ending the block), then exits with 1; the NMI handler
    exits with 2 first if the NMI came at once. Before, xenicorn took it only
    when the run loop next stopped for something else."""
    _protected_with_idt(machine)
    code = (bytes.fromhex("c705f000e0feff010000")      # mov dword [0xfee000f0], 0x1ff (SVR: enabled)
            + bytes.fromhex("c7050003e0fe00440000")    # mov dword [0xfee00300], 0x4400 (NMI, to APIC 0)
            + bytes.fromhex("eb00")                    # jmp $+2: a new block, as a ret would start
            + bytes.fromhex("b001e6f4" "ebfe"))        # mov al, 1 ; out 0xf4, al ; jmp $
    _load(machine, ENTRY, code)
    _load(machine, HANDLERS + 16 * 2, bytes.fromhex("b002e6f4" "ebfe"))   # NMI: mov al, 2 ; out 0xf4, al
    assert machine.run() == (2 << 1) | 1


def test_iomem_window_is_memory_of_any_width_and_saved(tmachine):
    """QEMU's pc-testdev memory at 0xFF000000 (kvm-unit-tests' IORAM_BASE_PHYS):
    what a write of any width stored, a read of any width returns."""
    base, mem = tmachine.mmio.lookup(0xFF000000)
    assert base == 0xFF000000
    mem.mmio_write(0x10, 8, 0x0123456789ABCDEF)
    assert mem.mmio_read(0x10, 4) == 0x89ABCDEF
    assert mem.mmio_read(0x13, 2) == 0x6789
    mem.mmio_write(0xFFFF, 2, 0xBEEF)                 # the byte past the end is dropped
    assert mem.mmio_read(0xFFFF, 1) == 0xEF
    _, dev = port(tmachine, 0xE0)
    rec = dev.save_record()
    mem.mmio_write(0x10, 8, 0)
    dev.apply_record(dev.check_record(rec))
    assert mem.mmio_read(0x10, 8) == 0x0123456789ABCDEF


def test_guest_moves_data_through_the_iomem_window(tmachine):
    """A guest stores to 0xFF000000 and loads back through MMIO exits, then exits with the byte."""
    _protected_with_idt(tmachine)
    code = (bytes.fromhex("c705000000ff78563412")      # mov dword [0xff000000], 0x12345678
            + bytes.fromhex("a0020000ff")              # mov al, [0xff000002]  (0x34)
            + bytes.fromhex("e6f4" "ebfe"))            # out 0xf4, al ; jmp $
    _load(tmachine, ENTRY, code)
    assert tmachine.run() == ((0x34 << 1) | 1) & 0xFF
