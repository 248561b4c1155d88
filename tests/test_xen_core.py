"""The Xen core: CPUID leaves, the hypercall page, dispatch and error codes.

Most tests set the registers of a vCPU sitting in 32-bit flat mode and feed
a synthetic Hypercall exit to ``Machine.handle_exit``, the run loop's own
entry for every exit: no guest code runs, so every error path is cheap to
reach.
"""
import shutil
import struct
import subprocess

import pytest

from xenicorn import exits as E
from xenicorn.engine.rawctx import RawContext
from xenicorn.xen import errno

BUF = 0x3000


def call32(machine, number, *args):
    vcpu = machine.vcpu
    vcpu.set_reg("rax", number)
    for reg, value in zip(("rbx", "rcx", "rdx", "rsi", "rdi"), args, strict=False):
        vcpu.set_reg(reg, value)
    machine.handle_exit(vcpu, E.Hypercall(0x100000, -1))
    eax = vcpu.reg("rax") & 0xFFFFFFFF
    return eax - (1 << 32) if eax >> 31 else eax


@pytest.fixture
def xen(machine):
    machine.vcpu.reset_to_flat32(0x100000, esp=0x9000)
    return machine


def test_cpuid_signature_version_and_hvm_leaf(xen):
    q = xen.cpuid.query
    a, b, c, d = q(0x40000000, 0)
    assert a == 0x40000005 and struct.pack("<III", b, c, d) == b"XenVMMXenVMM"
    assert q(0x40000001, 0)[0] == (4 << 16) | 17
    flags, vcpu_id, domid, _ = q(0x40000004, 0)
    assert flags & (1 << 3) and flags & (1 << 4) and vcpu_id == 0 and domid == 1


def test_cpuid_leaf_2_opens_the_msr_window_and_the_msr_write_closes_it(xen):
    assert not xen.vcpu.msr.is_open
    assert xen.cpuid.query(0x40000002, 0)[:2] == (1, 0x40000000)
    assert xen.vcpu.msr.is_open
    xen.handle_exit(xen.vcpu, E.Msr(0x100000, 0x40000000, True, 0x5000))
    assert not xen.vcpu.msr.is_open
    page = xen.memory.read(0x5000, 4096)
    # stub 17: mov eax, 17 ; vmcall ; ret  and int3 padding after it
    assert page[17 * 32:17 * 32 + 9] == bytes.fromhex("b811000000" "0f01c1" "c3")
    assert page[17 * 32 + 9:18 * 32] == b"\xcc" * 23
    assert page[23 * 32:23 * 32 + 2] == b"\x0f\x0b"          # iret: ud2
    assert xen.xen.state.hypercall_page == 0x5000


def test_amd_vendor_fills_the_page_with_vmmcall(machine):
    from xenicorn.devices.console import ConsoleSink
    from xenicorn.machine.machine import Machine, MachineConfig
    m = Machine(MachineConfig(ram_mib=16, vendor="amd"), console=ConsoleSink(None))
    m.xen.fill_hypercall_page(0x5000)
    assert m.memory.read(0x5000 + 32 * 29, 9) == bytes.fromhex("b81d000000" "0f01d9" "c3")


def test_xen_version_and_extraversion(xen):
    assert call32(xen, 17, 0) == 0x40011
    assert call32(xen, 17, 1, BUF) == 0
    assert xen.memory.read(BUF, 16) == b".0-xenicorn".ljust(16, b"\0")
    assert call32(xen, 17, 7) == 4096


def test_xen_version_errors(xen):
    assert call32(xen, 17, 1, 0xC0000000) == -errno.EFAULT       # not RAM
    assert call32(xen, 17, 9, BUF) == -errno.EPERM               # commandline: privileged
    assert call32(xen, 17, 10, BUF) == -errno.EPERM              # build_id: privileged
    assert call32(xen, 17, 99, BUF) == -errno.ENOSYS
    xen.memory.write_struct(BUF, "<II", 1, 0)
    assert call32(xen, 17, 6, BUF) == -errno.EINVAL              # submap index 1


def test_get_features_reports_what_is_implemented(xen):
    xen.memory.write_struct(BUF, "<II", 0, 0xFFFFFFFF)
    assert call32(xen, 17, 6, BUF) == 0
    idx, submap = xen.memory.read_struct(BUF, "<II")
    # auto_translated_physmap, hvm_callback_vector, safe pvclock, hvm_pirqs
    assert idx == 0 and submap == (1 << 2) | (1 << 8) | (1 << 9) | (1 << 10)


def test_console_io_write_goes_to_xens_log_with_the_domain_prefix(xen):
    xen.memory.write(BUF, b"hello xen\n")
    assert call32(xen, 18, 0, 10, BUF) == 0
    assert xen.xen_log.data == b"(d1) hello xen\n" and xen.console.data == b""   # xl dmesg, not xl console
    assert call32(xen, 18, 0, 10, 0xC0000000) == -errno.EFAULT
    assert call32(xen, 18, 0, 0x80000000, 0xC0000000) == -errno.EFAULT   # no size limit on writes
    assert call32(xen, 18, 1, 0x80000000, BUF) == -errno.E2BIG          # reads: at most INT_MAX
    assert call32(xen, 18, 7, 1, BUF) == -errno.ENOSYS


def test_console_io_lines_are_buffered_stripped_and_cut_as_xen_does(xen):
    log = xen.xen_log
    for piece in (b"one ", b"line", b" in pieces\nand a second\n"):
        xen.memory.write(BUF, piece)
        assert call32(xen, 18, 0, len(piece), BUF) == 0
    assert log.data == b"(d1) one line in pieces\n(d1) and a second\n"
    log.data.clear()
    text = b"tab\there\x07\x1b[0m\r\xe9\x85!\n"                     # BEL, ESC, CR, 0x85 go
    xen.memory.write(BUF, text)
    assert call32(xen, 18, 0, len(text), BUF) == 0
    assert log.data == b"(d1) tab\there[0m\xe9!\n"
    log.data.clear()
    # no newline: rounds of 127 wait in buf[256] until one does not fit, then
    # the buffer and that round are one line; the rest waits again
    xen.memory.write(BUF, b"x" * 400)
    assert call32(xen, 18, 0, 400, BUF) == 0
    assert log.data == b"(d1) " + b"x" * 381 + b"\n" and bytes(xen.xen.console_log.buf) == b"x" * 19
    log.data.clear()
    # a fault ends the call, the lines before it logged. Each round copies 127
    # bytes but consumes them only up to the first newline, so the round at
    # offset 130 of these 256 bytes at the end of RAM already faults: 65 lines
    end = xen.memory.size
    xen.memory.write(end - 256, b"a\n" * 128)
    assert call32(xen, 18, 0, 0x200, end - 256) == -errno.EFAULT
    assert log.data.count(b"\n") == 65 and log.data.startswith(b"(d1) " + b"x" * 19 + b"a\n(d1) a\n")


def test_a_partial_console_io_line_survives_a_snapshot(xen):
    from xenicorn.records import RecordError
    xen.memory.write(BUF, b"half a ")
    call32(xen, 18, 0, 7, BUF)
    clog = xen.xen.console_log
    record = clog.save_record()
    clog.buf.clear()
    clog.apply_record(clog.check_record(record))
    xen.memory.write(BUF, b"line\n")
    call32(xen, 18, 0, 5, BUF)
    assert xen.xen_log.data == b"(d1) half a line\n"
    with pytest.raises(RecordError):
        clog.check_record({**record, "state": {"pending": b"bad\x07".hex()}})


def test_console_io_read_takes_queued_input(xen):
    xen.xen.console_input += b"abc"
    assert call32(xen, 18, 1, 2, BUF) == 2
    assert xen.memory.read(BUF, 2) == b"ab"
    assert call32(xen, 18, 1, 10, BUF) == 1
    assert call32(xen, 18, 1, 10, BUF) == 0


def test_unknown_hypercall_is_enosys_and_cpl3_is_eperm(xen):
    assert call32(xen, 200) == -errno.ENOSYS
    assert call32(xen, 1) == -errno.ENOSYS                        # mmu_update: PV only
    with RawContext(xen.vcpu.uc) as ctx:
        ctx.set_cpl(3)
    assert call32(xen, 17, 0) == -errno.EPERM


def test_sched_op_shutdown_reasons_set_the_exit_status(xen):
    xen.memory.write_u32(BUF, 3)                                  # crash
    call32(xen, 29, 2, BUF)
    assert xen.status == 1 and xen.shutdown_reason == "crash"


def test_sched_op_errors(xen):
    xen.memory.write_u32(BUF, 9)
    assert call32(xen, 29, 2, BUF) == -errno.EINVAL               # no such reason
    assert call32(xen, 29, 2, 0xC0000000) == -errno.EFAULT
    xen.memory.write_struct(BUF, "<HxxI", 0, 0)
    assert call32(xen, 29, 4, BUF) == -errno.EPERM                # remote_shutdown dom0
    xen.memory.write_struct(BUF, "<HxxI", 7, 0)
    assert call32(xen, 29, 4, BUF) == -errno.ESRCH
    assert call32(xen, 29, 0) == 0                                # yield
    assert xen.status is None


GUEST = r"""
.code32
.globl _start
_start:
  mov $0x9000, %esp
  mov $0x40000002, %eax
  cpuid
  mov %ebx, %ecx
  mov $0x5000, %eax
  xor %edx, %edx
  wrmsr
  mov $0, %ebx
  mov $msglen, %ecx
  mov $msg, %edx
  call 0x5000 + 18*32
  mov $17, %eax
  xor %ebx, %ebx
  vmcall
  mov %eax, 0x2014
  movl $0, 0x2100
  mov $2, %ebx
  mov $0x2100, %ecx
  call 0x5000 + 29*32
  hlt
msg: .ascii "hello via console_io\n"
.set msglen, . - msg
"""


@pytest.mark.skipif(not shutil.which("gcc") or not shutil.which("ld"), reason="needs gcc and ld")
def test_guest_installs_the_page_and_calls_through_it(tmp_path, machine):
    src, obj, out = tmp_path / "g.S", tmp_path / "g.o", tmp_path / "g.bin"
    src.write_text(GUEST)
    subprocess.run(["gcc", "-m32", "-c", str(src), "-o", str(obj)], check=True)
    subprocess.run(["ld", "-m", "elf_i386", "-Ttext=0x100000", "--oformat", "binary", str(obj), "-o", str(out)],
                   check=True)
    code = out.read_bytes()
    machine.memory.write(0x100000, code)
    machine.memory.code_written(0x100000, len(code))
    machine.vcpu.reset_to_flat32(0x100000)
    assert machine.run() == 0
    assert machine.xen_log.data == b"(d1) hello via console_io\n" and machine.console.data == b""
    assert machine.memory.read_u32(0x2014) == 0x40011
    assert machine.shutdown_reason == "poweroff"
    assert machine.xen.hypercall_counts == {"console_io": 1, "xen_version": 1, "sched_op": 1}
    assert machine.exit_counts["Msr"] == 1 and not machine.vcpu.msr.is_open
