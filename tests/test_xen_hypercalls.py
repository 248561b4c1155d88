"""memory_op, hvm_op and vcpu_op in both guest widths, with Xen's error codes."""
import struct

import pytest
from unicorn import x86_const as X

from xenicorn import exits as E
from xenicorn.engine.rawctx import RawContext
from xenicorn.x86.segments import flat_code64, flat_data
from xenicorn.xen import errno
from xenicorn.xen.pvclock import TimeInfo, ticks_to_ns

BUF, BUF2, BUF3 = 0x3000, 0x4000, 0x5000
SELF = 0x7FF0


def enter_long_mode(machine):
    """Identity-map 1 GiB (2 MiB pages) and switch the vCPU to 64-bit mode."""
    mem, uc = machine.memory, machine.vcpu.uc
    mem.write_u64(0x10000, 0x11000 | 3)
    mem.write_u64(0x11000, 0x12000 | 3)
    for i in range(512):
        mem.write_u64(0x12000 + 8 * i, (i << 21) | 0x83)
    uc.reg_write(X.UC_X86_REG_CR4, 0x20)
    uc.reg_write(X.UC_X86_REG_CR3, 0x10000)
    uc.msr_write(0xC0000080, 0x100)
    uc.reg_write(X.UC_X86_REG_CR0, 0x80000011)
    with RawContext(uc) as ctx:
        ctx.load_segments(cs=flat_code64(0x10), ss=flat_data(0x18))
    assert machine.vcpu.code_bits() == 64


@pytest.fixture(params=[32, 64])
def xen(request, machine):
    machine.vcpu.reset_to_flat32(0x100000, esp=0x9000)
    if request.param == 64:
        enter_long_mode(machine)
    machine.bits = request.param
    return machine


def call(m, number, *args):
    vcpu = m.vcpu
    vcpu.set_reg("rax", number)
    regs = ("rdi", "rsi", "rdx", "r10", "r8") if m.bits == 64 else ("rbx", "rcx", "rdx", "rsi", "rdi")
    for reg, value in zip(regs, args, strict=False):
        vcpu.set_reg(reg, value)
    m.handle_exit(vcpu, E.Hypercall(0x100000, -1))
    mask = (1 << m.bits) - 1
    r = vcpu.reg("rax") & mask
    return r - (1 << m.bits) if r >> (m.bits - 1) else r


def ul(m):
    return "Q" if m.bits == 64 else "I"


# -- memory_op -----------------------------------------------------------------
def test_add_to_physmap_shared_info_makes_the_page_shared_info(xen):
    xen.memory.fill(0x20000, 4096, 0xAA)
    xen.memory.write_struct(BUF, f"<HHI{ul(xen)}{ul(xen)}", SELF, 0, 0, 0, 0x20)
    assert call(xen, 12, 7, BUF) == 0
    assert xen.xen.state.shared_info_gpa == 0x20000 and xen.xen.state.width == xen.bits
    version, sec, nsec = xen.xen.shared_info().wallclock()
    assert version % 2 == 0 and sec > 1_700_000_000 and nsec < 10**9
    info = TimeInfo.unpack(xen.memory.read(0x20000 + 0x20, 32))     # vcpu_info[0].time
    assert info.version % 2 == 0 and info.mul > 0
    assert xen.memory.read(0x20000 + 0x800, 8) == bytes(8)          # evtchn_pending cleared


def test_add_to_physmap_errors(xen):
    fmt = f"<HHI{ul(xen)}{ul(xen)}"
    for (domid, space, idx, gpfn), code in [
            ((SELF, 0, 1, 0x20), errno.EINVAL),            # shared_info idx must be 0
            ((5, 0, 0, 0x20), errno.ESRCH),                # another domain
            ((SELF, 2, 0, 0x20), errno.EOPNOTSUPP),        # gmfn
            ((SELF, 4, 0, 0x20), errno.EPERM),             # foreign
            ((SELF, 9, 0, 0x20), errno.EINVAL),            # unknown space
            ((SELF, 1, 64, 0x20), errno.EINVAL),           # grant frame beyond the limit
            ((SELF, 1, 0x80000000, 0x20), errno.EINVAL),   # v2 status frame
            ((SELF, 0, 0, 0xC0000), errno.EINVAL)]:        # gpfn not RAM
        xen.memory.write_struct(BUF, fmt, domid, 0, space, idx, gpfn)
        assert call(xen, 12, 7, BUF) == -code, (domid, space, idx)
    assert call(xen, 12, 7, 0xC0000000) == -errno.EFAULT
    xen.memory.write_struct(BUF, fmt, SELF, 0, 1, 3, 0xF0010)
    assert call(xen, 12, 7, BUF) == 0 and xen.xen.state.grant_frames == {3: 0xF0010}


def test_add_to_physmap_batch_reports_per_entry_errors(xen):
    w = xen.bits // 8
    xen.memory.write(BUF2, b"".join(i.to_bytes(w, "little") for i in (0, 99, 1)))     # idxs
    xen.memory.write(BUF3, b"".join(i.to_bytes(w, "little") for i in (0xF0000, 0xF0001, 0xF0002)))
    xen.memory.write_struct(BUF, f"<HHHH{ul(xen)}{ul(xen)}{ul(xen)}", SELF, 1, 3, 0, BUF2, BUF3, 0x6000)
    assert call(xen, 12, 23, BUF) == 0
    assert struct.unpack("<3i", xen.memory.read(0x6000, 12)) == (0, -errno.EINVAL, 0)
    assert xen.xen.state.grant_frames == {0: 0xF0000, 1: 0xF0002}


def test_memory_map_copies_the_e820_and_trims_to_the_buffer(xen):
    fmt = "<I4xQ" if xen.bits == 64 else "<II"
    xen.memory.write_struct(BUF, fmt, 2, BUF2)
    assert call(xen, 12, 9, BUF) == 0
    assert xen.memory.read_u32(BUF) == 2
    assert struct.unpack("<QQI", xen.memory.read(BUF2, 20)) == (0, 0x9FC00, 1)
    xen.memory.write_struct(BUF, fmt, 128, BUF2)
    assert call(xen, 12, 9, BUF) == 0 and xen.memory.read_u32(BUF) == len(xen.memory.e820())


def test_reservation_queries_and_ballooning(xen):
    pages = xen.memory.size // 4096
    xen.memory.write_struct(BUF, "<H", SELF)
    assert call(xen, 12, 3, BUF) == pages and call(xen, 12, 4, BUF) == pages + 256   # libxl's 1 MiB slack
    assert call(xen, 12, 2) == pages - 1
    xen.memory.write_struct(BUF, "<H", 3)
    assert call(xen, 12, 3, BUF) == -errno.ESRCH
    w = xen.bits // 8
    fmt = f"<{ul(xen)}{ul(xen)}IIH"
    xen.memory.write(BUF2, (0x400).to_bytes(w, "little") + (0x401).to_bytes(w, "little"))
    xen.memory.write(0x400000, b"\x55" * 16)
    xen.memory.write_struct(BUF, fmt, BUF2, 2, 0, 0, SELF)
    assert call(xen, 12, 1, BUF) == 2                                  # decrease_reservation
    assert xen.xen.state.ballooned == {0x400, 0x401} and xen.xen.state.pages == pages - 2
    assert xen.memory.read(0x400000, 16) == bytes(16)                  # the frame went back
    assert call(xen, 12, 1, BUF) == 0                                  # already gone
    assert call(xen, 12, 6, BUF) == 2 and not xen.xen.state.ballooned  # populate_physmap
    xen.memory.write_struct(BUF, fmt, BUF2, 1, 10, 0, SELF)
    assert call(xen, 12, 6, BUF) == 0                                  # order 10 > 9
    xen.memory.write_struct(BUF, fmt, 0xC0000000, 1, 0, 0, SELF)
    assert call(xen, 12, 1, BUF) == -errno.EFAULT
    assert call(xen, 12, 99, BUF) == -errno.ENOSYS
    assert call(xen, 12, 7 | (1 << 6), BUF) == -errno.ENOSYS          # continuation bits


# -- hvm_op ------------------------------------------------------------------
def param(m, cmd, index, value=0, domid=SELF):
    m.memory.write_struct(BUF, "<H2xIQ", domid, index, value)
    return call(m, 34, cmd, BUF)


def test_hvm_params_set_get_and_permissions(xen):
    via = (2 << 56) | 0xF3
    assert param(xen, 0, 0, via) == 0 and xen.xen.state.params[0] == via
    assert param(xen, 1, 0) == 0 and xen.memory.read_u64(BUF + 8) == via
    assert param(xen, 0, 10, 2) == 0 and param(xen, 0, 10, 4) == -errno.EINVAL   # TIMER_MODE
    assert param(xen, 0, 1, 0x1234) == -errno.EPERM                # STORE_PFN: toolstack's
    assert param(xen, 1, 1) == 0                                   # but the guest may read it
    assert param(xen, 1, 5) == -errno.EPERM                        # IOREQ_PFN: not even that
    assert param(xen, 0, 39, 1) == -errno.EINVAL                   # beyond HVM_NR_PARAMS
    assert param(xen, 0, 0, 0, domid=7) == -errno.ESRCH
    assert param(xen, 0, 0, (1 << 56) | (1 << 32) | (2 << 11)) == -errno.EINVAL   # INTx, domain 1
    assert call(xen, 34, 0, 0xC0000000) == -errno.EFAULT


def test_upcall_vector_time_and_pagetable_dying(xen):
    xen.memory.write_struct(BUF, "<IB", 0, 0xF3)
    assert call(xen, 34, 23, BUF) == 0 and xen.xen.state.upcall_vectors == {0: 0xF3}
    xen.memory.write_struct(BUF, "<IB", 0, 0x0F)
    assert call(xen, 34, 23, BUF) == -errno.EINVAL
    xen.memory.write_struct(BUF, "<IB", 4, 0x40)
    assert call(xen, 34, 23, BUF) == -errno.ENOENT
    assert call(xen, 34, 10, BUF) == 0
    t1 = xen.memory.read_u64(BUF)
    assert call(xen, 34, 10, BUF) == 0 and xen.memory.read_u64(BUF) >= t1
    xen.memory.write_struct(BUF, "<H6xQ", SELF, 0x1000)
    assert call(xen, 34, 9, BUF) == 0
    assert call(xen, 34, 77, BUF) == -errno.ENOSYS


# -- vcpu_op -------------------------------------------------------------------
def test_register_vcpu_info_moves_and_copies_it(xen):
    xen.memory.write_struct(BUF, f"<HHI{ul(xen)}{ul(xen)}", SELF, 0, 0, 0, 0x20)
    assert call(xen, 12, 7, BUF) == 0
    xen.memory.write_int(0x20000, 1, 1)                            # upcall_pending in shared_info
    xen.memory.write_struct(BUF, "<QII", 0x30, 0x40, 0)
    assert call(xen, 24, 10, 0, BUF) == 0
    assert xen.xen.vcpu_info(0).gpa == 0x30040 and xen.memory.read_u8(0x30040) == 1
    info = TimeInfo.unpack(xen.memory.read(0x30040 + 0x20, 32))
    assert info.version % 2 == 0 and info.tsc_timestamp > 0
    assert call(xen, 24, 10, 0, BUF) == -errno.EINVAL              # already registered
    xen.memory.write_struct(BUF, "<QII", 0x30, 4096 - 32, 0)
    assert call(xen, 24, 10, 0, BUF) == -errno.EINVAL              # offset too large
    assert call(xen, 24, 10, 1, BUF) == -errno.ENOENT              # no vCPU 1


def test_timers_runstate_and_is_up(xen):
    xen.memory.write_struct(BUF, "<Q", 999_999)
    assert call(xen, 24, 6, 0, BUF) == -errno.EINVAL               # under 1 ms
    xen.memory.write_struct(BUF, "<Q", 10_000_000)
    assert call(xen, 24, 6, 0, BUF) == 0 and xen.xen.vcpu_state(0).periodic_ns == 10_000_000
    assert call(xen, 24, 7, 0) == 0 and xen.xen.vcpu_state(0).periodic_ns == 0
    xen.memory.write_struct(BUF, "<QI", 1, 1)                      # in the past, "future" flag
    assert call(xen, 24, 8, 0, BUF) == -errno.ETIME
    xen.memory.write_struct(BUF, "<QI", 1 << 40, 0)
    assert call(xen, 24, 8, 0, BUF) == 0 and xen.xen.vcpu_state(0).singleshot_ns == 1 << 40
    assert call(xen, 24, 9, 0) == 0 and xen.xen.vcpu_state(0).singleshot_ns is None
    assert call(xen, 24, 3, 0) == 1
    assert call(xen, 24, 4, 0, BUF) == 0 and xen.memory.read_u32(BUF) == 0      # RUNSTATE_running
    xen.memory.write_struct(BUF2, "<Q", BUF3)
    assert call(xen, 24, 5, 0, BUF2) == 0 and xen.xen.vcpu_state(0).runstate_area == BUF3
    assert call(xen, 24, 4, 9, BUF) == -errno.ENOENT
    assert call(xen, 24, 55, 0, BUF) == -errno.ENOSYS


def test_pv_clock_agrees_with_the_guest_tsc(xen):
    xen.memory.write_struct(BUF, f"<HHI{ul(xen)}{ul(xen)}", SELF, 0, 0, 0, 0x20)
    assert call(xen, 12, 7, BUF) == 0
    info = TimeInfo.unpack(xen.memory.read(0x20000 + 0x20, 32))
    tsc_now = xen.xen.tsc.read()
    guest_ns = info.system_time + ticks_to_ns(tsc_now - info.tsc_timestamp, info.mul, info.shift)
    assert abs(guest_ns - xen.xen.now_ns()) < 50_000_000               # same clock, within 50 ms
