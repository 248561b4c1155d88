"""The gdb remote stub: the protocol from a raw socket, then the real gdb against bundled kernels.

Protocol tests run a small hand-made guest on a machine in a thread: a
32-bit loop that counts in memory until a flag word is set, then writes the
flag to isa-debug-exit (status ``(flag << 1) | 1``), with 32-bit paging
that maps linear 0x40000000 and 0x40001000 to two physical pages that are
not adjacent, and 0x40002000 to the LAPIC's MMIO page.
"""
from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import xml.dom.minidom
from pathlib import Path

import pytest
from unicorn.x86_const import UC_X86_REG_XMM0

from xenicorn.devices.console import ConsoleSink
from xenicorn.debug.gdbstub import MAX_WATCH, GdbStub, checksum, frame, parse_spec, target_xml
from xenicorn.machine.machine import Machine, MachineConfig

ENTRY = 0x100000
COUNTER, FLAG = 0x101000, 0x101004
# inc dword [COUNTER]; cmp dword [FLAG], 0; je ENTRY; mov al, [FLAG]; out 0xf4, al; jmp $
LOOP = bytes.fromhex("ff0500101000" "833d0410100000" "74f1" "a004101000" "e6f4" "ebfe")
LOOP_CMP = ENTRY + 6                       # the second instruction
PD, PT_LOW, PT_HIGH = 0x10000, 0x11000, 0x12000
LINEAR = 0x40000000                        # -> physical 0x5000, then 0x7000, then the LAPIC
PAGE_A, PAGE_B, LAPIC = 0x5000, 0x7000, 0xFEE00000
EIP = 8                                     # i386 register numbers (the 'g' order)
EAX = 0

FIRMWARE = Path(__file__).resolve().parent.parent / "xenicorn" / "firmware" / "images"


def build_machine(smp: int = 1) -> Machine:
    m = Machine(MachineConfig(ram_mib=16, debugcon="none", count_instructions=True, smp=smp),
                console=ConsoleSink(None))
    mem = m.memory
    mem.write(ENTRY, LOOP)
    mem.code_written(ENTRY, len(LOOP))
    mem.write_u32(PD, PT_LOW | 3)
    mem.write_u32(PD + (LINEAR >> 22) * 4, PT_HIGH | 3)
    for i in range(1024):                   # identity map the first 4 MiB
        mem.write_u32(PT_LOW + i * 4, (i << 12) | 3)
    for i, phys in enumerate((PAGE_A, PAGE_B, LAPIC)):
        mem.write_u32(PT_HIGH + i * 4, phys | 3)
    vcpu = m.vcpu
    vcpu.reset_to_flat32(ENTRY, esp=0x90000)
    vcpu.set_reg("cr3", PD)
    vcpu.set_reg("cr0", vcpu.reg("cr0") | 0x80000000)
    return m


class Rsp:
    """A minimal gdb: frames packets, checks acks and checksums."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)   # as gdb: acks go out at once
        self.buf = b""

    def _byte(self) -> int:
        while not self.buf:
            data = self.sock.recv(4096)
            if not data:
                raise EOFError("stub closed the connection")
            self.buf += data
        b, self.buf = self.buf[0], self.buf[1:]
        return b

    def send(self, payload: bytes | str) -> None:
        payload = payload.encode("latin-1") if isinstance(payload, str) else payload
        self.sock.sendall(frame(payload))
        assert chr(self._byte()) == "+"

    def recv(self) -> str:
        while self._byte() != ord("$"):
            pass
        body = bytearray()
        while (b := self._byte()) != ord("#"):
            body.append(b)
        cc = int(bytes((self._byte(), self._byte())), 16)
        assert cc == checksum(bytes(body)), "stub sent a bad checksum"
        self.sock.sendall(b"+")
        return body.decode("latin-1")

    def cmd(self, payload: bytes | str) -> str:
        self.send(payload)
        return self.recv()

    def reg(self, n: int) -> int:
        return int.from_bytes(bytes.fromhex(self.cmd(f"p{n:x}")), "little")

    def close(self) -> None:
        self.sock.close()


def stopped_session(m, nothing_ran):
    """Run ``m`` stopped (-S) in a thread, gdb's side connected: yields (machine, client, thread, result).

    ``nothing_ran(m)`` must hold before gdb connects (-S: no guest
    instruction runs before gdb); at the end the guest ends itself through
    FLAG and the machine must stop.
    """
    m.gdb = GdbStub(m, "127.0.0.1", 0, wait=True)
    result: dict = {}
    thread = threading.Thread(target=lambda: result.setdefault("status", m.run()), daemon=True)
    thread.start()
    time.sleep(0.2)
    assert nothing_ran(m)
    client = Rsp(m.gdb.port)
    yield m, client, thread, result
    client.close()
    if thread.is_alive():
        m.memory.write_u32(FLAG, 0x7F)                               # the guest ends itself
    thread.join(10)
    assert not thread.is_alive(), "the machine did not end"
    m.close()


@pytest.fixture
def session():
    """A stopped (-S) machine in a thread, gdb's side connected; the machine's exit status at the end."""
    yield from stopped_session(build_machine(), lambda m: m.vcpu.instructions == 0 and m.vcpu.pc == ENTRY)


def test_acks_checksums_and_the_first_stop_reply(session):
    _, c, *_ = session
    c.sock.sendall(b"junk+$?#00")                         # noise is skipped, a bad checksum is NAKed
    assert chr(c._byte()) == "-"
    assert c.cmd("?") == "T05thread:01;"
    c.sock.sendall(b"$qC#b4")                            # a correct checksum, written by hand
    assert chr(c._byte()) == "+" and c.recv() == "QC1"


def test_queries_and_unknown_packets(session):
    _, c, *_ = session
    features = c.cmd("qSupported:multiprocess+;swbreak+;xmlRegisters=i386")
    assert "PacketSize=4000" in features and "qXfer:features:read+" in features and "vContSupported+" in features
    assert c.cmd("qAttached") == "1"
    assert c.cmd("qfThreadInfo") == "m1" and c.cmd("qsThreadInfo") == "l"
    assert c.cmd("Hg0") == "OK" and c.cmd("Hc-1") == "OK" and c.cmd("Hg2") == "E22"
    assert c.cmd("vCont?") == "vCont;c;C;s;S"
    assert c.cmd("qNoSuchQuery") == "" and c.cmd("vMustReplyEmpty") == "" and c.cmd("!") == ""
    # the target description, read in small pieces as gdb may
    xml_text, offset = "", 0
    while True:
        part = c.cmd(f"qXfer:features:read:target.xml:{offset:x},80")
        xml_text += part[1:]
        offset += len(part) - 1
        if part[0] == "l":
            break
        assert part[0] == "m"
    doc = xml.dom.minidom.parseString(xml_text)
    assert doc.getElementsByTagName("architecture")[0].firstChild.data == "i386"   # a 32-bit CPU, no ELF
    names = [r.getAttribute("name") for r in doc.getElementsByTagName("reg")]
    assert names[:10] == ["eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi", "eip", "eflags"]
    assert c.cmd("qXfer:features:read:other.xml:0,100") == "E00"
    assert c.cmd("qXfer:features:read:target.xml:ffffff,10") == "E00"
    assert c.cmd("qXfer:features:read:target.xml:zz") == "E22"


def test_malformed_arguments_and_unreachable_memory_are_errors(session):
    m, c, *_ = session
    for bad in ("mzz,4", "m100000", "m100000,", "M100000,4:zz", "M100000,4:0011", "M100000,2",
                "Z0,xyz,1", "Z9,100000,1", "Z0,100000", "z0,,1", "P0", "P0=123", "Gabc", "p", "pzz",
                "vCont;x", "vCont;c:5", "Hq1", "qThreadExtraInfo,7", "m" + "1" * 40 + ",4",
                "m100000,100000"):
        assert c.cmd(bad) == "E22", bad
    assert c.cmd("p999") == "E14" and c.cmd("P999=00") == "E14"
    assert c.cmd(f"m{LINEAR + 0x3000:x},4") == "E14"          # not mapped in the page tables
    assert c.cmd(f"m{LINEAR + 0x2ffe:x},4") == "E14"          # runs into the LAPIC page: MMIO
    assert c.cmd(f"M{LINEAR + 0x2000:x},1:ff") == "E14"
    assert c.cmd("Z2,101000,0") == "E22" and c.cmd(f"Z2,{MAX_WATCH + 1:x},{MAX_WATCH + 1:x}") == "E22"
    assert c.cmd(f"Z2,{LINEAR + 0x3000:x},4") == "E14"        # nothing mapped there to watch
    assert c.cmd(f"Z3,{LINEAR + 0x2000:x},4") == "E14"        # a device, not RAM
    assert c.cmd("?") == "T05thread:01;"                      # still alive and stopped
    assert m.vcpu.instructions == 0


def test_memory_through_the_page_tables_across_a_page_boundary(session):
    m, c, *_ = session
    m.memory.write(PAGE_A + 0xFFC, b"\x01\x02\x03\x04")
    m.memory.write(PAGE_B, b"\x05\x06\x07\x08")
    assert c.cmd(f"m{LINEAR + 0xffc:x},8") == "0102030405060708"
    assert c.cmd(f"M{LINEAR + 0xffe:x},4:aabbccdd") == "OK"
    assert m.memory.read(PAGE_A + 0xFFC, 4) == b"\x01\x02\xaa\xbb"
    assert m.memory.read(PAGE_B, 4) == b"\xcc\xdd\x07\x08"
    # X: binary, with "#", "$", "}" and "*" escaped
    raw = b"#$}*"
    escaped = b"".join(b"}" + bytes((b ^ 0x20,)) for b in raw)
    assert c.cmd(b"X%x,4:" % (LINEAR + 0x10) + escaped) == "OK"
    assert m.memory.read(PAGE_A + 0x10, 4) == raw
    assert c.cmd(f"X{LINEAR:x},0:") == "OK"                   # gdb's probe for X support
    # run-length encoding: 'f*"' is "f" and 5 more (ord('"') - 29): ffffff
    assert c.cmd(f'M{LINEAR + 0x20:x},3:f*"') == "OK" and m.memory.read(PAGE_A + 0x20, 3) == b"\xff" * 3
    # the walk set no Accessed bits: reading from a debugger is invisible to the guest
    assert m.memory.read_u32(PD + (LINEAR >> 22) * 4) & 0x20 == 0
    # and the guest's protections do not apply to it: a user page under SMAP, a read-only page
    m.memory.write_u32(PD + (LINEAR >> 22) * 4, PT_HIGH | 7)
    m.memory.write_u32(PT_HIGH, PAGE_A | 5)                   # present, user, read-only
    m.vcpu.set_reg("cr4", m.vcpu.reg("cr4") | (1 << 21))
    m.vcpu.set_reg("cr0", m.vcpu.reg("cr0") | (1 << 16))      # WP: even the kernel may not write it
    assert c.cmd(f"M{LINEAR + 0xffc:x},2:5a5a") == "OK" and c.cmd(f"m{LINEAR + 0xffc:x},2") == "5a5a"


def test_registers_write_read_back_and_take_effect(session):
    m, c, *_ = session
    assert c.reg(EIP) == ENTRY
    assert c.cmd(f"P{EAX:x}=78563412") == "OK"
    assert c.reg(EAX) == 0x12345678
    regs = c.cmd("g")
    assert c.cmd("G" + regs) == "OK" and c.cmd("g") == regs
    one = "0000000000000080ff3f"                                # 1.0 as an x87 80-bit value
    xmm = bytes(range(16)).hex()
    assert c.cmd(f"P10={one}") == "OK" and c.cmd("p10") == one   # st0
    assert c.cmd(f"P20={xmm}") == "OK" and c.cmd("p20") == xmm   # xmm0
    assert m.vcpu.uc.reg_read(UC_X86_REG_XMM0) == int.from_bytes(bytes(range(16)), "little")
    assert c.cmd("P9=ffffffff") == "OK" and c.reg(9) == 0x3F7FD7  # eflags: reserved bits stay as the CPU has them
    assert c.cmd("P9=02000000") == "OK"
    # make the guest's counter word readable through eax's value: write memory, step one inc
    assert c.cmd(f"M{COUNTER:x},4:05000000") == "OK"
    assert c.cmd("s") == "T05thread:01;"
    assert c.reg(EIP) == LOOP_CMP and m.memory.read_u32(COUNTER) == 6
    assert m.vcpu.instructions == 1
    # writing EIP moves the guest: back to the inc, one more step
    assert c.cmd(f"P{EIP:x}={ENTRY.to_bytes(4, 'little').hex()}") == "OK"
    assert c.cmd("vCont;s:1;c") == "T05thread:01;"
    assert m.memory.read_u32(COUNTER) == 7 and c.reg(EIP) == LOOP_CMP


def test_a_64_bit_kernel_in_32_bit_mode_sees_zero_extended_registers(session):
    """The amd64 layout (an ELF64 kernel) while the CPU still runs 32-bit code, as at a PVH entry."""
    import types
    m, c, *_ = session
    m.kernel = types.SimpleNamespace(bits=64)                 # what boot() records from the ELF class
    m.vcpu.set_reg("rax", 0xDEADBEEF_12345678)
    assert "i386:x86-64" in c.cmd("qXfer:features:read:target.xml:0,fff")
    assert c.cmd("p0") == "7856341200000000"                  # rax: the low half, zero-extended
    assert c.cmd("p10") == (ENTRY.to_bytes(8, "little")).hex()   # rip, 8 bytes
    assert len(bytes.fromhex(c.cmd("g"))) == 16 * 8 + 8 + 4 + 6 * 4 + 8 * 10 + 8 * 4 + 16 * 16 + 4 + 2 * 8 + 5 * 8
    assert c.cmd("P0=efbeadde00000000") == "OK" and m.vcpu.reg("rax") == 0xDEADBEEF


def test_steps_over_a_hypercall_and_port_io_are_one_instruction_each(session):
    """VMCALL and OUT leave Unicorn for Python (Xen, the debug console): each is still one step."""
    m, c, *_ = session
    # mov eax, 17 (xen_version); xor ebx, ebx (XENVER_version); vmcall; mov al, 'A'; out 0xe9, al; hlt
    code = bytes.fromhex("b811000000" "31db" "0f01c1" "b041" "e6e9" "f4")
    m.memory.write(0x100200, code)
    m.memory.code_written(0x100200, len(code))
    assert c.cmd(f"P{EIP:x}={(0x100200).to_bytes(4, 'little').hex()}") == "OK"
    pcs = []
    for _ in range(6):
        assert c.cmd("vCont;s:1") == "T05thread:01;"
        pcs.append(c.reg(EIP))
        if pcs[-1] == 0x10020A:
            assert c.reg(EAX) == (4 << 16) | 17                 # Xen 4.17 answered the hypercall
    assert pcs == [0x100205, 0x100207, 0x10020A, 0x10020C, 0x10020E, 0x10020F]
    assert m.vcpu.instructions == 6 and m.vcpu.halted           # the last step executed the hlt


def test_breakpoints_stop_before_the_instruction_and_resume_past_it(session):
    m, c, *_ = session
    assert c.cmd(f"Z0,{LOOP_CMP:x},1") == "OK"
    assert c.cmd("c") == "T05thread:01;"
    assert c.reg(EIP) == LOOP_CMP and m.memory.read_u32(COUNTER) == 1
    assert c.cmd("vCont;c") == "T05thread:01;"                 # resumes from the breakpoint itself
    assert c.reg(EIP) == LOOP_CMP and m.memory.read_u32(COUNTER) == 2
    assert m.vcpu.instructions == 4                            # inc cmp je | inc: exact
    assert c.cmd(f"z0,{LOOP_CMP:x},1") == "OK"
    assert c.cmd(f"Z1,{ENTRY:x},1") == "OK"                    # hbreak: the same mechanism
    assert c.cmd("c") == "T05thread:01;"
    assert c.reg(EIP) == ENTRY and m.memory.read_u32(COUNTER) == 2
    assert c.cmd(f"z1,{ENTRY:x},1") == "OK"
    # code patched through M runs at once, though Unicorn had translated the old bytes
    assert c.cmd(f"Z0,{LOOP_CMP:x},1") == "OK"
    assert c.cmd("c") == "T05thread:01;"                       # the loop is translated now
    assert c.cmd(f"M{ENTRY + 2:x},1:08") == "OK"               # inc dword [COUNTER + 8] instead
    assert c.cmd("c") == "T05thread:01;"
    assert m.memory.read_u32(COUNTER) == 3 and m.memory.read_u32(COUNTER + 8) == 1


def test_watchpoints_stop_after_the_access_and_name_it(session):
    m, c, *_ = session
    assert c.cmd(f"Z2,{COUNTER:x},4") == "OK"                 # written by the inc
    assert c.cmd("c") == f"T05thread:01;watch:{COUNTER:x};"
    assert c.reg(EIP) == LOOP_CMP and m.memory.read_u32(COUNTER) == 1   # just after the store
    assert c.cmd("c") == f"T05thread:01;watch:{COUNTER:x};"
    assert m.memory.read_u32(COUNTER) == 2 and m.vcpu.instructions == 4
    assert c.cmd(f"z2,{COUNTER:x},4") == "OK"
    assert c.cmd(f"Z3,{FLAG + 2:x},1") == "OK"                # read by the cmp's 4-byte load
    assert c.cmd("c") == f"T05thread:01;rwatch:{FLAG + 2:x};"
    assert c.reg(EIP) == ENTRY + 0xD and m.memory.read_u32(COUNTER) == 2
    assert c.cmd(f"z3,{FLAG + 2:x},1") == "OK"
    # a write through another linear address of the same RAM is seen too (watched by physical page):
    # mov dword [0x5010], 0xaa writes PAGE_A + 0x10 through the identity map
    assert c.cmd(f"Z4,{LINEAR + 0x10:x},4") == "OK"
    m.memory.write(0x100100, bytes.fromhex("c70510500000aa000000" "ebfe"))
    m.memory.code_written(0x100100, 12)
    assert c.cmd("c100100") == f"T05thread:01;awatch:{LINEAR + 0x10:x};"
    assert c.reg(EIP) == 0x10010A and m.memory.read_u32(PAGE_A + 0x10) == 0xAA
    assert c.cmd(f"z4,{LINEAR + 0x10:x},4") == "OK" and not m.gdb.watchpoints and m.gdb._watch_step_hook is None
    assert c.cmd(f"P{EIP:x}={ENTRY.to_bytes(4, 'little').hex()}") == "OK"   # back to the loop that can end


def test_ctrl_c_interrupts_a_running_guest_and_detach_lets_it_finish(session):
    m, c, thread, result = session
    c.send("c")
    time.sleep(0.3)
    before = m.memory.read_u32(COUNTER)
    assert before > 0
    c.sock.sendall(b"\x03")
    assert c.recv() == "T02thread:01;"
    stopped_at = m.memory.read_u32(COUNTER)
    time.sleep(0.2)
    assert m.memory.read_u32(COUNTER) == stopped_at            # really stopped
    assert c.cmd(f"M{FLAG:x},4:21000000") == "OK"
    assert c.cmd("D") == "OK"
    thread.join(10)
    assert result["status"] == (0x21 << 1) | 1


def test_a_client_that_disconnects_leaves_the_machine_running(session):
    m, c, thread, result = session
    assert c.cmd(f"Z0,{ENTRY:x},1") == "OK"
    c.close()
    time.sleep(0.3)
    assert m.memory.read_u32(COUNTER) > 10                     # running, and its breakpoint is gone
    assert not m.gdb.breakpoints
    c2 = Rsp(m.gdb.port)                                       # a new gdb stops it again
    assert c2.cmd("?") == "T05thread:01;"
    stopped_at = m.memory.read_u32(COUNTER)
    time.sleep(0.2)
    assert m.memory.read_u32(COUNTER) == stopped_at
    c2.close()
    m.memory.write_u32(FLAG, 2)
    thread.join(10)
    assert result["status"] == 5


def test_a_client_that_stops_reading_is_dropped_not_waited_for(monkeypatch):
    """Replies are sent from the machine's thread: a full socket must not hang the machine."""
    from xenicorn.debug import gdbstub
    monkeypatch.setattr(gdbstub, "SEND_TIMEOUT_S", 0.3)
    m = build_machine()
    m.gdb = GdbStub(m, "127.0.0.1", 0, wait=True)
    thread = threading.Thread(target=m.run, daemon=True)
    thread.start()
    s = socket.create_connection(("127.0.0.1", m.gdb.port), timeout=20)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    request = frame(b"m100000,1000")                          # 8 KiB of hex per reply, never read
    try:
        for _ in range(3000):
            s.sendall(request)
    except OSError:
        pass                                                   # the stub gave up on us first
    deadline = time.monotonic() + 20
    while m.memory.read_u32(COUNTER) == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert m.memory.read_u32(COUNTER) > 0 and not m.gdb.attached   # dropped, and the guest runs
    m.memory.write_u32(FLAG, 1)
    thread.join(10)
    s.close()
    m.close()
    assert m.status == 3


def test_kill_ends_the_machine_like_qemu(session):
    m, c, thread, result = session
    c.sock.sendall(frame(b"k"))
    thread.join(10)
    assert result["status"] == 0 and m.shutdown_reason == "gdb-kill"


def test_continue_at_an_address(session):
    m, c, thread, result = session
    m.memory.write_u32(FLAG, 3)
    assert c.cmd(f"Z0,{ENTRY + 0x14:x},1") == "OK"             # the out
    assert c.cmd(f"c{ENTRY + 0xf:x}") == "T05thread:01;"       # start at the mov al, [FLAG]
    assert c.reg(EIP) == ENTRY + 0x14 and m.memory.read_u32(COUNTER) == 0
    assert c.reg(EAX) & 0xFF == 3
    c.send("c")
    thread.join(10)
    assert result["status"] == 7
    assert c.recv() == "W07"                                   # the "process" exited


def test_hostile_input_gets_replies_never_a_dead_stub(session):
    """Random packets and framing garbage: every packet is answered, none with an internal error."""
    import random
    m, c, thread, result = session
    rng = random.Random(7)
    heads = ["m", "M", "X", "p", "P", "g", "G", "Z0,", "z1,", "Z4,", "H", "T", "qXfer:features:read:target.xml:",
             "qThreadExtraInfo,", "qSupported:", "qAttached:", "vCont?", "vFile:", "?", "Q", "qC", "i", "b"]
    alphabet = "0123456789abcdefABCDEFxyz,:;=-+.}*# $"
    for _ in range(400):
        body = rng.choice(heads) + "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 24)))
        body = body.replace("#", "").replace("$", "")
        raw = body.encode()
        if body.startswith("G"):
            raw = b"G" + bytes(rng.randrange(256) for _ in range(rng.randrange(0, 40))).hex().encode()
        reply = c.cmd(raw)
        assert not reply.startswith("E01"), (body, reply)
    c.sock.sendall(bytes(rng.randrange(256) for _ in range(3000)).replace(b"$", b"").replace(b"\x03", b""))
    c.sock.sendall(b"$" + b"a" * 70000)                        # never terminated: dropped and NAKed
    deadline = time.monotonic() + 5
    while b"-" not in c.buf and time.monotonic() < deadline:
        c.buf += c.sock.recv(4096)
    c.buf = b""
    c.sock.sendall(b"#00")                                    # leftovers of the dropped packet
    started = time.monotonic()
    c.sock.sendall(b"+" * 2_000_000)                          # a flood of noise costs linear time
    assert c.cmd("?") == "T05thread:01;" and m.gdb.state == "stopped"
    assert time.monotonic() - started < 3
    c.sock.sendall(frame(b"k"))                               # the fuzzed registers are no state to resume
    thread.join(10)
    assert result["status"] == 0


def test_ctrl_c_reaches_a_guest_halted_for_good(session):
    """cli; hlt would end the machine ("halted", status 1): with gdb attached it waits for gdb."""
    m, c, thread, result = session
    m.memory.write(0x100100, b"\xfa\xf4")
    m.memory.code_written(0x100100, 2)
    c.send("c100100")
    time.sleep(0.3)
    assert thread.is_alive() and m.vcpu.halted
    c.sock.sendall(b"\x03")
    assert c.recv() == "T02thread:01;" and c.reg(EIP) == 0x100102
    c.close()                                                  # no debugger left: the usual verdict
    thread.join(10)
    assert result["status"] == 1 and m.shutdown_reason == "halted"


def test_unicorn_facts_the_stub_relies_on():
    """Counting mode (emu_start count=N): a code hook's emu_stop lands *before* its
    instruction, but Unicorn's counter already includes it; count=1 runs exactly one
    instruction, an OUT or a VMCALL finished by a hook included; a hook added after
    the code was translated fires only once the cache is flushed."""
    from unicorn import (
        UC_ARCH_X86,
        UC_HOOK_CODE,
        UC_HOOK_INSN,
        UC_HOOK_INSN_INVALID,
        UC_MODE_32,
        Uc,
    )
    from unicorn import x86_const as X

    from xenicorn.engine import icount
    uc = Uc(UC_ARCH_X86, UC_MODE_32)
    uc.mem_map(0, 0x10000)
    # inc dword [0x3000]; out 0xe9, al; vmcall; inc ebx; jmp 0x1000
    uc.mem_write(0x1000, bytes.fromhex("ff0500300000" "e6e9" "0f01c1" "43" "ebf2"))
    uc.hook_add(UC_HOOK_INSN, lambda *a: None, None, 1, 0, X.UC_X86_INS_OUT)

    def vmcall(uc, _):
        uc.reg_write(X.UC_X86_REG_EIP, uc.reg_read(X.UC_X86_REG_EIP) + 3)
        return True
    uc.hook_add(UC_HOOK_INSN_INVALID, vmcall)
    pc = 0x1000
    steps = []
    for _ in range(5):
        uc.emu_start(pc, 0xFFFFFFFF, count=1)
        pc = uc.reg_read(X.UC_X86_REG_EIP)
        steps.append(pc)
    assert steps == [0x1006, 0x1008, 0x100B, 0x100C, 0x1000]
    uc.emu_start(0x1000, 0xFFFFFFFF, count=40)                  # everything translated, no hook
    hits = []

    def stop(uc, address, size, _):
        hits.append(address)
        uc.emu_stop()
    uc.hook_add(UC_HOOK_CODE, stop, None, 0x1000, 0x1000)
    uc.emu_start(0x1006, 0xFFFFFFFF, count=40)
    assert hits == []                                          # the cached blocks have no hook
    uc.ctl_flush_tb()
    uc.mem_write(0x3000, bytes(4))
    uc.emu_start(0x1006, 0xFFFFFFFF, count=40)
    assert hits == [0x1000] and uc.reg_read(X.UC_X86_REG_EIP) == 0x1000
    assert uc.mem_read(0x3000, 4) == bytes(4)                  # the inc at the breakpoint did not run
    assert icount.read_counter(uc) == 5                        # 4 executed, the stopped one counted


def test_spec_parsing_and_target_descriptions():
    assert parse_spec("tcp::1234") == ("0.0.0.0", 1234)
    assert parse_spec("tcp:localhost:4321") == ("localhost", 4321)
    assert parse_spec("5555") == ("0.0.0.0", 5555)
    for bad in ("tcp:1234x", "udp::1", "tcp::0", "tcp::70000", "unix:/tmp/x", ""):
        with pytest.raises(ValueError):
            parse_spec(bad)
    for bits, arch, pc in ((32, "i386", "eip"), (64, "i386:x86-64", "rip")):
        doc = xml.dom.minidom.parseString(target_xml(bits))
        assert doc.getElementsByTagName("architecture")[0].firstChild.data == arch
        regs = {r.getAttribute("name"): int(r.getAttribute("bitsize")) for r in doc.getElementsByTagName("reg")}
        assert regs[pc] == bits and regs["st0"] == 80 and regs["mxcsr"] == 32
        assert sum(1 for n in regs if n.startswith("xmm")) == bits // 4


def test_cli_rejects_bad_specs_and_busy_ports_in_one_line(capsys):
    from xenicorn.cli import main
    assert main(["run", "spin32", "-gdb", "udp::1234"]) == 2
    assert main(["run", "spin32", "-s", "-gdb", "tcp::1235"]) == 2
    assert main(["run", "spin32", "-S"]) == 2
    busy = socket.socket()
    busy.bind(("0.0.0.0", 0))
    busy.listen(1)
    try:
        assert main(["run", "spin32", "-gdb", f"tcp::{busy.getsockname()[1]}"]) == 2
    finally:
        busy.close()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("xenicorn: error: ") for line in err)
    assert "-gdb" in err[3] and "in use" in err[3]


# ----------------------------------------------------------------------
# the real gdb
# ----------------------------------------------------------------------
# batch mode, no ~/.gdbinit, and no core file of gdb itself if it hits an internal error
GDB_FLAGS = ("-batch", "-nx", "-iex", "maint set internal-error corefile no")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _symbols(elf: Path) -> dict[str, int]:
    out = subprocess.run(["nm", str(elf)], capture_output=True, text=True, check=True).stdout
    rows = (line.split() for line in out.splitlines() if line.count(" ") == 2)
    return {name: int(addr, 16) for addr, _, name in rows}


def _start(kernel: str, port: int) -> subprocess.Popen:
    # no probe connection: any client that connects and goes away resumes the
    # guest; gdb itself retries a refused connection (set tcp connect-timeout)
    return subprocess.Popen([sys.executable, "-m", "xenicorn", "run", kernel, "-gdb", f"tcp::{port}", "-S",
                             "--timeout", "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _gdb(elf: Path, port: int, commands: list[str]) -> str:
    args = ["gdb", *GDB_FLAGS, "-ex", "set pagination off", "-ex", "set tcp connect-timeout 30",
            "-ex", f"file {elf}",
            "-ex", f"target remote 127.0.0.1:{port}"]
    for c in commands:
        args += ["-ex", c]
    done = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    return done.stdout + done.stderr


needs_gdb = pytest.mark.skipif(shutil.which("gdb") is None or shutil.which("nm") is None,
                               reason="gdb (and nm) are not installed")


@needs_gdb
@pytest.mark.parametrize("kernel,pc,bits", [("hello64", "rip", 64), ("hello32", "eip", 32)])
def test_gdb_breaks_steps_reads_and_detaches(kernel, pc, bits):
    elf = FIRMWARE / f"{kernel}.elf"
    sym = _symbols(elf)
    port = _free_port()
    proc = _start(kernel, port)
    try:
        out = _gdb(elf, port, [
            "break kmain", "continue", f"info registers {pc}", "p/x $pc", "stepi", "p/x $pc", "x/2i $pc",
            "info registers", "x/s *((char **)&e820_names + 1)", "p/x **(unsigned int **)&start_info",
            "hbreak printf", "continue", "p/x $pc",
            "delete", "detach"])
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    width = 16 if bits == 64 else 8
    kmain = sym["kmain"]
    assert f"Breakpoint 1, 0x{kmain:0{width}x} in kmain ()" in out, out
    assert re.search(rf"^{pc}\s+0x{kmain:x}\s+0x{kmain:x} <kmain>", out, re.MULTILINE), out
    pcs = [int(v, 16) for v in re.findall(r"^\$\d+ = (0x[0-9a-f]+)", out, re.MULTILINE)]
    # stepi moved the pc by the length of kmain's first instruction (x/2i shows the next one)
    first = ""
    if shutil.which("objdump"):
        first = subprocess.run(["objdump", "-d", f"--start-address={kmain:#x}", f"--stop-address={kmain + 16:#x}",
                                str(elf)], capture_output=True, text=True, check=True).stdout
    assert pcs[0] == kmain and pcs[1] > kmain
    if first:
        line = next(ln for ln in first.splitlines() if ln.strip().startswith(f"{kmain:x}:"))
        length = len(line.split("\t")[1].split())
        assert pcs[1] == kmain + length, (line, pcs)
    assert f"=> 0x{pcs[1]:x} <kmain+{pcs[1] - kmain}>:" in out
    assert re.search(r"^cs\s+0x(10|8)\b", out, re.MULTILINE)
    assert re.search(r"^eflags\s+0x[0-9a-f]+\s+\[", out, re.MULTILINE)
    esp = int(re.search(r"^[re]sp\s+0x([0-9a-f]+)", out, re.MULTILINE).group(1), 16)
    assert 0x100000 < esp < 0x200000                               # on the kernel's boot stack
    assert '"RAM"' in out                                          # a string read through a pointer
    assert "= 0x336ec578" in out                                   # start_info->magic (PVH)
    assert "Hardware assisted breakpoint 2 at" in out and pcs[-1] == sym["printf"]
    assert "[Inferior 1 (Remote target) detached]" in out
    assert proc.returncode == 0 and "Test result: SUCCESS" in stdout, (stdout, stderr)


@needs_gdb
def test_gdb_hardware_watchpoint_shows_old_and_new_value():
    elf = FIRMWARE / "xencore64.elf"
    port = _free_port()
    proc = _start("xencore64", port)
    try:
        out = _gdb(elf, port, ["watch *(int *)&xen_present", "continue", "p/x $pc", "delete", "continue"])
        stdout, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert "Hardware watchpoint 1: *(int *)&xen_present" in out, out
    assert "Old value = 0\nNew value = 1" in out
    pc = int(re.search(r"^\$1 = (0x[0-9a-f]+)", out, re.MULTILINE).group(1), 16)
    # the stop is just after the store: the instruction before pc writes xen_present
    dis = subprocess.run(["objdump", "-d", "--insn-width=16", f"--start-address={pc - 10:#x}",
                          f"--stop-address={pc:#x}", str(elf)],
                         capture_output=True, text=True, check=True).stdout if shutil.which("objdump") else ""
    assert not dis or "<xen_present>" in dis.strip().splitlines()[-1], dis
    assert "[Inferior 1 (Remote target) exited normally]" in out
    assert proc.returncode == 0 and "Test result: SUCCESS" in stdout


@needs_gdb
def test_gdb_ctrl_c_interrupts_and_kill_ends_xenicorn():
    """Ctrl-C at gdb (SIGINT to it) reaches the stub as 0x03; "kill" ends xenicorn (status 0, as QEMU)."""
    import signal
    elf = FIRMWARE / "spin32.elf"
    spin = _symbols(elf)["_start"]
    port = _free_port()
    proc = _start("spin32", port)
    try:
        gdb = subprocess.Popen(["gdb", *GDB_FLAGS, "-ex", "set tcp connect-timeout 30", "-ex", f"file {elf}",
                                "-ex", f"target remote 127.0.0.1:{port}", "-ex", "continue", "-ex", "p/x $pc",
                                "-ex", "kill"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 20
        while "spinning" not in (proc.stdout.readline() or "") and time.monotonic() < deadline:
            pass                                                   # the guest runs: gdb has continued
        time.sleep(0.3)
        gdb.send_signal(signal.SIGINT)
        out, _ = gdb.communicate(timeout=30)
        _, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert "Program received signal SIGINT, Interrupt." in out, out
    pc = int(re.search(r"^\$1 = (0x[0-9a-f]+)", out, re.MULTILINE).group(1), 16)
    assert spin <= pc < spin + 0x10                                # inside the kernel's spin loop
    assert "[Inferior 1 (Remote target) killed]" in out
    assert proc.returncode == 0 and "terminated via the gdb stub" in stderr


def test_dash_S_with_only_a_monitor_waits_for_its_cont(tmp_path):
    import json
    sock_path = str(tmp_path / "qmp.sock")
    proc = subprocess.Popen([sys.executable, "-m", "xenicorn", "run", "hello32", "-S", "-qmp",
                             f"unix:{sock_path},server,wait=off", "--timeout", "30"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 15
        while not Path(sock_path).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        s = socket.socket(socket.AF_UNIX)
        s.connect(sock_path)
        f = s.makefile("rwb")
        f.readline()

        def qmp(cmd: str) -> dict:
            f.write(json.dumps({"execute": cmd}).encode() + b"\n")
            f.flush()
            while "event" in (reply := json.loads(f.readline())):
                pass
            return reply
        qmp("qmp_capabilities")
        time.sleep(0.3)
        assert qmp("query-status")["return"]["status"] == "paused"
        qmp("cont")
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0 and "Test result: SUCCESS" in out
