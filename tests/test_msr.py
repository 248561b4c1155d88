"""The MSR intercept window: WRMSR/RDMSR exits only while someone asks."""
import struct

from unicorn import x86_const as X

from xenicorn import exits as E
from xenicorn.engine.msr import msrpm_position

from test_machine import POWEROFF, CLI_HLT, load

# mov ecx,0x40000000 ; mov eax,0x00345000 ; mov edx,0x12 ; wrmsr ;
# rdmsr ; mov [0x2000],eax ; mov [0x2004],edx ; poweroff
GUEST = (bytes.fromhex("b900000040" "b800503400" "ba12000000" "0f30" "0f32"
                       "a300200000" "891504200000") + POWEROFF + CLI_HLT)


def test_closed_window_lets_unicorn_drop_the_msr(machine):
    machine.vcpu.msr.close("kernel-start")               # open from power-on (IA32_APIC_BASE)
    assert not machine.vcpu.msr.is_open
    seen = []
    machine.msr_handlers[0x40000000] = lambda vcpu, ex: seen.append(ex)
    load(machine, GUEST)
    assert machine.run() == 0
    assert seen == []
    assert machine.memory.read_u32(0x2000) == 0          # dropped write, read as 0


def _trap_xen_msr(machine, read_value: int) -> list:
    """Open the window on MSR 0x40000000; record (pc, msr, write, value); reads return ``read_value``."""
    seen = []

    def handler(vcpu, ex: E.Msr):
        seen.append((ex.pc, ex.msr, ex.write, ex.value))
        if not ex.write:
            ex.value = read_value

    machine.msr_handlers[0x40000000] = handler
    machine.vcpu.msr.open("test")
    return seen


def test_open_window_traps_write_and_read_of_the_xen_msr(machine):
    seen = _trap_xen_msr(machine, 0xAABBCCDD_11223344)
    load(machine, GUEST)
    assert machine.run() == 0
    assert [x[1:] for x in seen] == [(0x40000000, True, 0x12_00345000), (0x40000000, False, 0)]
    assert machine.memory.read_u32(0x2000) == 0x11223344
    assert machine.memory.read_u32(0x2004) == 0xAABBCCDD
    assert machine.exit_counts["Msr"] == 2


def test_closing_the_window_stops_the_exits(machine):
    machine.vcpu.msr.close("kernel-start")               # the power-on interest (IA32_APIC_BASE)
    machine.vcpu.msr.open("a")
    machine.vcpu.msr.open("b")
    machine.vcpu.msr.close("a")
    assert machine.vcpu.msr.is_open
    machine.vcpu.msr.close("b")
    assert not machine.vcpu.msr.is_open
    load(machine, GUEST)
    assert machine.run() == 0
    assert "Msr" not in machine.exit_counts


def test_permission_map_positions_follow_the_amd_layout():
    assert msrpm_position(0x0) == (0, 0)
    assert msrpm_position(0x6E0) == (0x6E0 // 4, 0)       # TSC_DEADLINE
    assert msrpm_position(0xC0000080) == (0x800 + 0x80 // 4, 0)   # EFER
    assert msrpm_position(0xC0010117) == (0x1000 + 0x117 // 4, (0x117 % 4) * 2)
    assert msrpm_position(0x40000000) is None             # outside: always exits


# int3 (handler: iret) ; then GUEST's WRMSR/RDMSR of the Xen MSR
AFTER_INT3 = bytes.fromhex("cc") + GUEST


def _int3_then(machine, code: bytes):
    """Flat 32-bit code at 0x100000 (CS 0x10, as the PVH entry) whose #BP handler is IRET."""
    from test_interrupts import CODE32_DPL0, DATA_DPL0, GDT, IDT, gate32
    load(machine, code)
    machine.memory.write(GDT, struct.pack("<4Q", 0, 0, CODE32_DPL0, DATA_DPL0))
    machine.memory.write(IDT + 8 * 3, gate32(0x400000, selector=0x10))
    machine.memory.write(0x400000, bytes.fromhex("cf"))                  # iret
    uc = machine.vcpu.uc
    uc.reg_write(X.UC_X86_REG_GDTR, (0, GDT, 4 * 8 - 1, 0))
    uc.reg_write(X.UC_X86_REG_IDTR, (0, IDT, 256 * 8 - 1, 0))


def test_an_intercept_after_int3_keeps_its_own_rip(machine):
    """Unicorn leaves exception_is_int set after INT3; the next SVM exit must not
    jump back to the INT3's return address (what broke Linux's int3 self-test)."""
    seen = _trap_xen_msr(machine, 0x5566_7788)
    _int3_then(machine, AFTER_INT3)
    assert machine.run() == 0
    wrmsr = 0x100000 + 1 + 15
    assert [(pc, write) for pc, _, write, _ in seen] == [(wrmsr, True), (wrmsr + 2, False)]
    assert machine.memory.read_u32(0x2000) == 0x5566_7788


def test_intercepted_rdtsc_and_rdtscp_after_int3(machine):
    # int3 ; rdtsc ; mov [0x2000],eax ; mov ecx,0xC0000103 ; mov eax,7 ; xor edx,edx ; wrmsr ;
    # rdtscp ; mov [0x2004],eax ; mov [0x2008],ecx ; poweroff
    code = (bytes.fromhex("cc" "0f31" "a300200000" "b9030100c0" "b807000000" "31d2" "0f30"
                          "0f01f9" "a304200000" "890d08200000") + POWEROFF + CLI_HLT)
    machine.guest_tsc = lambda: 0x1234_5678_9ABC
    machine.vcpu.msr.intercept_rdtsc()
    _int3_then(machine, code)
    assert machine.run() == 0
    assert machine.memory.read_u32(0x2000) == 0x5678_9ABC
    assert machine.memory.read_u32(0x2004) == 0x5678_9ABC
    assert machine.memory.read_u32(0x2008) == 7                       # RDTSCP's ECX = TSC_AUX


# mov eax,7 ; xor ecx,ecx ; cpuid ; mov [0x2008],edx ; mov ecx,0x10a ; rdmsr ;
# mov [0x2000],eax ; mov [0x2004],edx ; poweroff
ARCH_CAP_GUEST = (bytes.fromhex("b807000000" "31c9" "0fa2" "891508200000" "b90a010000" "0f32"
                                "a300200000" "891504200000") + POWEROFF + CLI_HLT)


def test_the_cpu_reports_no_meltdown_class_flaws_through_arch_capabilities(machine):
    """CPUID.7:EDX[29] offers IA32_ARCH_CAPABILITIES; the MSR answers from the window it opens."""
    from xenicorn.x86.cpuid import ARCH_CAPABILITIES
    load(machine, ARCH_CAP_GUEST)
    assert machine.run() == 0
    assert machine.memory.read_u32(0x2008) & (1 << 29)
    value = machine.memory.read_u32(0x2000) | machine.memory.read_u32(0x2004) << 32
    assert value == ARCH_CAPABILITIES
    assert value & 1 and value & (1 << 5) and value & (1 << 4)        # RDCL_NO, MDS_NO, SSB_NO
    assert "arch-capabilities" in machine.vcpu.msr.interests           # open until user mode


def test_the_arch_capabilities_window_closes_at_the_first_syscall(machine, monkeypatch):
    from xenicorn.x86 import syscall
    load(machine, ARCH_CAP_GUEST)
    machine.run()
    monkeypatch.setattr(syscall, "do_syscall", lambda vcpu: None)
    assert machine.vcpu.msr.is_open
    machine.dispatch._syscall(machine.vcpu, E.Syscall(0x100000, "syscall"))
    assert not machine.vcpu.msr.is_open


def test_writing_arch_capabilities_is_a_gp(machine, monkeypatch):
    delivered = []
    monkeypatch.setattr(machine.dispatch, "deliver",
                        lambda vcpu, vector, etype, code=None: delivered.append((vector, code)))
    machine.dispatch._arch_capabilities(machine.vcpu, E.Msr(0x100000, 0x10A, True, 0))
    assert delivered == [(13, 0)]


# mov ecx,0x1b ; rdmsr ; mov [0x2000],eax ; mov [0x2004],edx ;
# or eax,0x200 (bit 9, reserved) ; wrmsr ; poweroff
APIC_BASE_GUEST = (bytes.fromhex("b91b000000" "0f32" "a300200000" "891504200000" "0d00020000" "0f30")
                   + POWEROFF + CLI_HLT)


def test_apic_base_msr_reads_the_enabled_xapic_page_and_bsp_flag(machine, monkeypatch):
    """IA32_APIC_BASE (SDM vol. 3 §10.4.4) on the BSP: 0xFEE00000 | EN (bit 11) | BSP (bit 8).
    Unicorn alone answers 0 (APIC disabled); a write setting reserved bit 9 is #GP(0)."""
    delivered = []

    def spy(vcpu, vector, etype, code=None):
        delivered.append((vector, code))
        vcpu.set_reg("rip", vcpu.reg("rip") + 2)           # step over the WRMSR instead
        return E.Action.CONTINUE
    monkeypatch.setattr(machine.dispatch, "deliver", spy)
    load(machine, APIC_BASE_GUEST)
    assert "kernel-start" in machine.vcpu.msr.interests       # open from power-on
    assert machine.run() == 0
    assert machine.memory.read_u32(0x2000) == 0xFEE00000 | (1 << 11) | (1 << 8)
    assert machine.memory.read_u32(0x2004) == 0
    assert delivered == [(13, 0)]


def test_apic_base_msr_has_no_bsp_flag_on_an_ap_and_keeps_writes_of_its_value():
    from xenicorn.devices.console import ConsoleSink
    from xenicorn.machine.machine import Machine, MachineConfig
    m = Machine(MachineConfig(ram_mib=16, debugcon="none", smp=2), console=ConsoleSink(None))
    try:
        ex = E.Msr(0x100000, 0x1B, False, 0)
        m.dispatch._apic_base(m.vcpus[1], ex)
        assert ex.value == 0xFEE00000 | (1 << 11)
        assert "kernel-start" in m.vcpus[1].msr.interests
        ok = E.Msr(0x100000, 0x1B, True, 0xFEE00000 | (1 << 11) | (1 << 8))
        assert m.dispatch._apic_base(m.vcpu, ok) is E.Action.CONTINUE
    finally:
        m.close()


def test_the_kernel_start_window_closes_at_the_first_syscall(machine, monkeypatch):
    from xenicorn.x86 import syscall
    monkeypatch.setattr(syscall, "do_syscall", lambda vcpu: None)
    assert machine.vcpu.msr.is_open
    machine.dispatch._syscall(machine.vcpu, E.Syscall(0x100000, "syscall"))
    assert not machine.vcpu.msr.is_open
