"""The MSR intercept window: WRMSR/RDMSR exits only while someone asks."""
from xenicorn.platform import exits as E
from xenicorn.platform.msr import msrpm_position

from test_machine import POWEROFF, CLI_HLT, load

# mov ecx,0x40000000 ; mov eax,0x00345000 ; mov edx,0x12 ; wrmsr ;
# rdmsr ; mov [0x2000],eax ; mov [0x2004],edx ; poweroff
GUEST = (bytes.fromhex("b900000040" "b800503400" "ba12000000" "0f30" "0f32"
                       "a300200000" "891504200000") + POWEROFF + CLI_HLT)


def test_closed_window_lets_unicorn_drop_the_msr(machine):
    seen = []
    machine.msr_handlers[0x40000000] = lambda vcpu, ex: seen.append(ex)
    load(machine, GUEST)
    assert machine.run() == 0
    assert seen == []
    assert machine.memory.read_u32(0x2000) == 0          # dropped write, read as 0


def test_open_window_traps_write_and_read_of_the_xen_msr(machine):
    seen = []

    def handler(vcpu, ex: E.Msr):
        seen.append((ex.msr, ex.write, ex.value))
        if not ex.write:
            ex.value = 0xAABBCCDD_11223344

    machine.msr_handlers[0x40000000] = handler
    machine.vcpu.msr.open("test")
    load(machine, GUEST)
    assert machine.run() == 0
    assert seen == [(0x40000000, True, 0x12_00345000), (0x40000000, False, 0)]
    assert machine.memory.read_u32(0x2000) == 0x11223344
    assert machine.memory.read_u32(0x2004) == 0xAABBCCDD
    assert machine.exit_counts["Msr"] == 2


def test_closing_the_window_stops_the_exits(machine):
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
