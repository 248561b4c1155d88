"""The run loop and exit dispatch, with synthetic exits and tiny guests."""
import struct

from xenicorn import exits as E

ENTRY = 0x100000


def load(machine, code: bytes, entry: int = ENTRY):
    machine.memory.write(entry, code)
    machine.memory.code_written(entry, len(code))
    machine.vcpu.reset_to_flat32(entry, esp=0x90000)


# Hand-assembled 32-bit code (no assembler needed by the tests).
def out_e9(ch: int) -> bytes:
    return bytes([0xB0, ch, 0xE6, 0xE9])                  # mov al, ch ; out 0xe9, al


POWEROFF = bytes.fromhex("66b80020" "66ba0406" "66ef")      # mov ax,0x2000 ; mov dx,0x604 ; out dx,ax
DEBUG_EXIT_3 = bytes.fromhex("b003e6f4")                      # mov al,3 ; out 0xf4, al
SPIN = bytes.fromhex("ebfe")                                  # jmp $
CLI_HLT = bytes.fromhex("faf4")


def test_unclaimed_port_read_returns_all_ones_through_the_handler(machine):
    ex = E.PortIO(-1, 0x80, 2, False)
    assert machine.handle_exit(machine.vcpu, ex) is E.Action.CONTINUE
    assert ex.value == 0xFFFF


def test_cpuid_exit_answers_from_the_policy(machine):
    ex = E.Cpuid(-1, 0, 0)
    machine.handle_exit(machine.vcpu, ex)
    _, ebx, ecx, edx = ex.result
    assert struct.pack("<III", ebx, edx, ecx) == b"GenuineIntel"
    ex = E.Cpuid(-1, 1, 0)
    machine.handle_exit(machine.vcpu, ex)
    assert ex.result[2] & (1 << 31), "hypervisor-present bit"


def test_fetch_from_unmapped_memory_is_a_crash_with_a_message(machine):
    ex = E.UnmappedAccess(0xC0000000, 0xC0000000, 1, "fetch")
    assert machine.handle_exit(machine.vcpu, ex) is E.Action.STOP
    assert machine.status == 1
    assert "0xc0000000" in machine.shutdown_message


def test_guest_prints_on_debugcon_and_powers_off(machine):
    load(machine, out_e9(ord("h")) + out_e9(ord("i")) + POWEROFF + CLI_HLT)
    assert machine.run() == 0
    assert machine.console.data == b"hi"
    assert machine.shutdown_reason == "poweroff"


def test_isa_debug_exit_sets_the_status(machine):
    load(machine, DEBUG_EXIT_3 + SPIN)
    assert machine.run() == (3 << 1) | 1
    assert machine.shutdown_reason == "debug-exit"


def test_hlt_with_interrupts_disabled_ends_the_run(machine):
    load(machine, out_e9(ord("x")) + CLI_HLT)
    assert machine.run() == 1
    assert machine.shutdown_reason == "halted"
    assert "interrupts disabled" in machine.shutdown_message
    assert machine.exit_counts["Hlt"] == 1


def test_unassigned_physical_memory_reads_float_high(machine):
    # mov eax, [0xC0000000] ; mov [0x2000], eax ; poweroff
    code = bytes.fromhex("a1000000c0" "a300200000") + POWEROFF + CLI_HLT
    load(machine, code)
    assert machine.run() == 0
    assert machine.memory.read_u32(0x2000) == 0xFFFFFFFF


def test_cpuid_instruction_reaches_the_policy(machine):
    # xor eax,eax ; cpuid ; mov [0x2000],ebx ; mov [0x2004],edx ; mov [0x2008],ecx ; poweroff
    code = (bytes.fromhex("31c0" "0fa2" "891d00200000" "891504200000" "890d08200000")
            + POWEROFF + CLI_HLT)
    load(machine, code)
    assert machine.run() == 0
    assert machine.memory.read(0x2000, 12) == b"GenuineIntel"


def test_timeout_stops_a_spinning_guest(machine):
    machine.config.timeout = 0.2
    load(machine, SPIN)
    assert machine.run() == 124
    assert machine.shutdown_reason == "timeout"


def test_an_emulator_bug_in_a_hook_becomes_one_message_not_a_traceback(machine):
    class Broken:
        def pio_read(self, offset, size):
            raise RuntimeError("device model bug")

        def pio_write(self, offset, size, value):
            pass
    machine.pio.register(0x300, 1, Broken())
    load(machine, bytes.fromhex("66ba0003" "ec") + SPIN)   # mov dx,0x300 ; in al,dx
    assert machine.run() == 1
    assert machine.shutdown_reason == "internal-error"
    assert "device model bug" in machine.shutdown_message


def test_mmio_device_sees_guest_loads_and_stores_as_offsets(machine):
    class Regs:
        def __init__(self):
            self.log = []

        def mmio_read(self, offset, size):
            self.log.append(("r", offset, size))
            return 0xCAFEF00D

        def mmio_write(self, offset, size, value):
            self.log.append(("w", offset, size, value))

    dev = Regs()
    machine.register_mmio(0xFEB00000, 0x1000, dev)       # a free range (0xFED00000 is the HPET's)
    # mov dword [0xFEB00010], 0x12345678 ; mov eax, [0xFEB00040] ; mov [0x2000], eax ; poweroff
    code = (bytes.fromhex("c70510"+"00b0fe" + "78563412") + bytes.fromhex("a1" + "4000b0fe")
            + bytes.fromhex("a300200000") + POWEROFF + CLI_HLT)
    load(machine, code)
    assert machine.run() == 0
    assert dev.log == [("w", 0x10, 4, 0x12345678), ("r", 0x40, 4)]
    assert machine.memory.read_u32(0x2000) == 0xCAFEF00D
    assert machine.exit_counts["Mmio"] == 2


def test_cpuid_leaf_15_gives_the_tsc_rate_and_the_lapic_crystal(machine):
    """Linux computes crystal_kHz * EBX / EAX in 32 bits and sets the LAPIC timer period from ECX."""
    from xenicorn.x86.cpuid import CRYSTAL_HZ
    assert machine.cpuid.query(0, 0)[0] >= 0x15
    eax, ebx, ecx, edx = machine.cpuid.query(0x15, 0)
    assert ecx == CRYSTAL_HZ == 1_000_000_000                       # the LAPIC timer's bus clock
    assert (CRYSTAL_HZ // 1000) * ebx < 1 << 32                      # no overflow in Linux's arithmetic
    tsc_khz = (CRYSTAL_HZ // 1000) * ebx // eax
    assert abs(tsc_khz * 1000 - machine.tsc.hz()) < 0.002 * machine.tsc.hz()
    machine.cpuid.tsc_hz = lambda: 5.5e9                             # a fast host: the ratio is halved
    eax, ebx, _, _ = machine.cpuid.query(0x15, 0)
    assert (CRYSTAL_HZ // 1000) * ebx < 1 << 32 and abs((CRYSTAL_HZ // 1000) * ebx // eax - 5_500_000) < 5_000
