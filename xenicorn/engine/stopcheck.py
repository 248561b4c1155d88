"""Make ``emu_stop()`` land between blocks, never half-way through an instruction.

What goes wrong without this (measured in ``tests/test_stopcheck.py``):
Unicorn 2.1.4 emits a "stop requested?" check after *every* guest load and
store it translates, so that an invalid access ends emulation at once. When
a stop has been requested (``emu_stop()``: by ``emu_start``'s timeout
thread, or by one of our own hooks) that check leaves the translated block
and puts RIP back at the start of the instruction that made the access. The
access itself has already happened. So the instruction runs again on the
next ``emu_start``: ``inc dword [x]`` adds 2, an MMIO store reaches its
device twice. For a timeout the race is real: a loop of read-modify-write
instructions stopped by ``timeout=`` replayed one in every stop.

The checks are only emitted while ``uc_struct.no_exit_request`` is false (a
flag Unicorn uses itself for ARM IT blocks). With it set, a stop request is
seen only at the check every block starts with, where QEMU restores RIP to
the block's first instruction: nothing has run twice. Unicorn has no API for
the flag, so, as with the instruction counter (``icount.py``), we find it in
``uc_struct`` once per process and set it with ctypes.

How it is found: ``nested_level`` (an int that is 1 inside a hook during
``emu_start`` and 0 outside) follows 64 ``sigjmp_buf`` (200 bytes each on
x86-64 glibc); just before them lie the bools ``no_exit_request`` (0) and
``init_done`` (1). A behavioural check then confirms it: a block with two
MMIO stores whose callback requests a stop must see each store once.

The price: an invalid memory access no longer stops the block at once. No
xenicorn access is invalid in Unicorn's sense (unassigned memory is mapped on
demand, see ``vcpu._on_unmapped``), so nothing depends on that. It is not
used while Unicorn counts instructions: its counting hook relies on the same
check to stop before the instruction after the last counted one.
"""
from __future__ import annotations

import functools

import ctypes
import struct

from unicorn import Uc, UC_ARCH_X86, UC_MODE_64, UC_HOOK_INSN
from unicorn import x86_const as X

from .rawctx import cpu_state_address, env_ptr_offset
from .startup import EngineUnsupported

JMP_BUFS = 64 * 200               # UC_MAX_NESTED_LEVEL sigjmp_bufs before nested_level


class FlagNotFound(EngineUnsupported):
    """This Unicorn build does not lay out ``uc_struct`` as 2.1.4 does."""


def _handle(uc: Uc) -> int:
    return ctypes.cast(uc._uch, ctypes.c_void_p).value


def _find_offset() -> int:
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0, 0x4000)
    uc.mem_write(0x1000, b"\x90\xe6\x80\x90\xf4")          # nop; out 0x80, al; nop; hlt
    span = 0x8000
    inside: list[bytes] = []
    uc.hook_add(UC_HOOK_INSN, lambda u, *a: inside.append(ctypes.string_at(_handle(u), span)),
                None, 1, 0, X.UC_X86_INS_OUT)
    uc.emu_start(0x1000, 0x1005)
    outside = ctypes.string_at(_handle(uc), span)
    found = []
    for off in range(JMP_BUFS + 8, span - 4, 4):
        if struct.unpack_from("<i", inside[0], off)[0] == 1 and struct.unpack_from("<i", outside, off)[0] == 0:
            bufs = off - JMP_BUFS
            if outside[bufs - 5] == 1 and outside[bufs - 6] == 0:     # init_done, no_exit_request
                found.append(bufs - 6)
    if len(found) != 1 or not _stops_once(found[0]):
        raise FlagNotFound("cannot locate Unicorn's no_exit_request flag; install unicorn==2.1.4")
    return found[0]


def _stops_once(offset: int) -> bool:
    """Two MMIO stores in one block, the first asking to stop: each seen once?"""
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0, 0x4000)
    store = bytes.fromhex("89042500000200")                 # mov [0x20000], eax
    code = store + b"\xff\xc1" + store + b"\xf4"            # ... inc ecx ... hlt
    uc.mem_write(0x1000, code)
    writes = []

    def on_write(u, off, size, value, _):
        writes.append(off)
        u.emu_stop()

    uc.mmio_map(0x20000, 0x1000, None, None, on_write, None)
    ctypes.c_uint8.from_address(_handle(uc) + offset).value = 1
    pc = 0x1000
    for _ in range(4):
        uc.emu_start(pc, 0x1000 + len(code))
        pc = uc.reg_read(X.UC_X86_REG_RIP)
        if pc == 0x1000 + len(code):
            break
    return len(writes) == 2 and uc.reg_read(X.UC_X86_REG_ECX) == 1


@functools.cache
def offset() -> int:
    """Where ``uc_struct.no_exit_request`` is (found on the first call; checked by ``engine.probe()``)."""
    return _find_offset()


forget_offset = offset.cache_clear            # look again on the next call (``engine.reset_probe()``)


def stop_between_blocks(uc: Uc) -> None:
    """From now on, blocks this engine translates check for stops only at their start."""
    ctypes.c_uint8.from_address(_handle(uc) + offset()).value = 1


# -- stopping without a visible stop_request -------------------------------------------
#
# ``uc_emu_stop()`` sets ``uc_struct.stop_request``, and while it is set
# Unicorn skips instruction hooks (its CPUID, SYSCALL and SYSENTER hook loops
# end early) and block hooks for the rest of the block, which with stops
# between blocks still runs (docs/unicorn-notes.md). A *soft stop* does only
# what ends the run at the next block start: QEMU's ``cpu_exit`` (hw/core/
# cpu.c: ``exit_request = 1`` and ``icount_decr.u16.high = -1``, the word
# every block's first check reads; its third field, ``tcg_exit_req``, is
# written but never read in 2.1.4), written here field by field, and
# ``uc_struct.invalid_error`` set to a value no Unicorn error has, which
# ``tcg_cpu_exec`` treats as "finish" and ``emu_start`` returns as its
# error code. ``stop_request`` is never set.
#
# It used to call ``emu_stop()`` and take ``stop_request`` back right after.
# From the stop-timer's thread that left a window, as long as the thread
# took to get the GIL back, in which the guest ran on with ``stop_request``
# set: a SYSCALL there went to no hook and only advanced RIP, so the system
# call "returned" its own number (``read`` returned 0, ``pipe`` returned 22).
# Measured: Linux with two vCPUs (a stop every millisecond) lost a pipe's
# data or hung in a futex every few thousand forks; a bare-Unicorn probe
# (SYSCALL in a loop, the stop-timer at random deadlines) skipped 2 system
# calls in 64,000 stops (tests/test_stopcheck.py shows the window itself).
#
# ``invalid_error`` sits at a fixed distance from the instruction counter
# that :mod:`icount` locates (uc_priv.h of 2.1.4: ``emu_counter``,
# ``emu_count``, ``size_recur_mem``, ``init_tcg``, ``stop_request``, ...,
# ``invalid_addr``, ``invalid_error``); the ``CPUState`` fields are found by
# what ``emu_stop()`` changes (:func:`cpu_exit_fields`);
# :func:`soft_stop_selftest` checks both by behaviour.
SOFT_STOP = 0x5A57                       # emu_start's error code after a soft stop
STOP_REQUEST_FROM_COUNTER = 21
INVALID_ERROR_FROM_COUNTER = 56
CPU_SPAN = 0x400                         # the start of CPUState, up to env_ptr and past it


@functools.cache
def cpu_exit_fields() -> tuple[int, int]:
    """``CPUState`` offsets of ``exit_request`` and ``icount_decr_ptr``.

    Found once per process: inside a hook, ``emu_stop()`` runs ``cpu_exit``,
    which turns exactly one byte before ``env_ptr`` from 0 to 1 (the bool
    ``exit_request``) and the high half of the word ``icount_decr_ptr``
    (the pointer after ``env_ptr``) points at from 0 to 0xFFFF.
    """
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0, 0x4000)
    uc.mem_write(0x1000, b"\xe6\x80\xf4")                 # out 0x80, al; hlt
    cpu = cpu_state_address(uc)
    decr_at = env_ptr_offset() + 8
    seen = []

    def on_out(u, port, size, value, _):
        decr = ctypes.c_uint64.from_address(cpu + decr_at).value
        before = (ctypes.string_at(cpu, CPU_SPAN), ctypes.c_uint16.from_address(decr + 2).value)
        u.emu_stop()
        if stop_request_set(u):                          # and the uc_struct field, seen from outside
            seen.append((before, (ctypes.string_at(cpu, CPU_SPAN), ctypes.c_uint16.from_address(decr + 2).value)))

    uc.hook_add(UC_HOOK_INSN, on_out, None, 1, 0, X.UC_X86_INS_OUT)
    uc.emu_start(0x1000, 0x1003)
    if len(seen) == 1:
        (old, old_high), (new, new_high) = seen[0]
        flips = [i for i in range(decr_at) if old[i] == 0 and new[i] == 1]
        if len(flips) == 1 and (old_high, new_high) == (0, 0xFFFF):
            return flips[0], decr_at
    raise FlagNotFound("cannot locate QEMU's cpu_exit fields in this Unicorn build; install unicorn==2.1.4")


def cpu_exit(uc: Uc) -> None:
    """QEMU's ``cpu_exit``: leave the translated code at the next block start (no ``stop_request``)."""
    exit_request, decr_at = cpu_exit_fields()
    cpu = cpu_state_address(uc)
    ctypes.c_uint8.from_address(cpu + exit_request).value = 1
    decr = ctypes.c_uint64.from_address(cpu + decr_at).value
    ctypes.c_int16.from_address(decr + 2).value = -1


def soft_stop(uc: Uc) -> None:
    """End the run at the next block start; hooks still run until then. Safe from any thread."""
    from .icount import field_address
    sync_pc_on_exit(uc)
    ctypes.c_int32.from_address(field_address(uc, INVALID_ERROR_FROM_COUNTER)).value = SOFT_STOP
    cpu_exit(uc)


def stop_request_set(uc: Uc) -> bool:
    """Is ``uc_struct.stop_request`` set (hooks being skipped for the rest of the block)?"""
    from .icount import field_address
    return bool(ctypes.c_uint8.from_address(field_address(uc, STOP_REQUEST_FROM_COUNTER)).value)


# -- a stale "skip the PC sync" flag -----------------------------------------------------
#
# ``uc_reg_write(RIP)`` sets ``uc_struct.skip_sync_pc_on_exit`` (so that the
# exit it forces keeps the new RIP), and only ``emu_start`` or an exit through
# the block-start stop check clears it. When a hook writes RIP while handling
# an exception (every interrupt xenicorn delivers from a hook, SYSCALL, a
# hypercall), the exit it forces is taken elsewhere and the flag stays set;
# the *next* stop at a block start then leaves RIP as it was last written,
# not at that block: the run returned an old RIP and the guest resumed there,
# re-running code. Measured: int3 handled in a hook, then a loop whose OUT hook
# stops the run: RIP came back as the int3's return address. That was the
# random memory corruption of Linux boots with the host clock (~half of them);
# counting runs sync RIP before every instruction and never showed it.
# Every stop xenicorn requests clears the flag first (:func:`sync_pc_on_exit`).
# The field is the last of ``uc_struct`` (uc_priv.h, 2.1.4); it is found from
# ``no_exit_request`` across the 64 jump buffers and the fields between, and
# checked by behaviour in :func:`soft_stop_selftest`.
SKIP_SYNC_FROM_NO_EXIT_REQUEST = 6 + JMP_BUFS + 58


def sync_pc_on_exit(uc: Uc) -> None:
    """Make the next stop restore RIP from the block it lands at (clears ``skip_sync_pc_on_exit``)."""
    ctypes.c_uint8.from_address(_handle(uc) + offset() + SKIP_SYNC_FROM_NO_EXIT_REQUEST).value = 0


def emu_stop(uc: Uc) -> None:
    """``uc.emu_stop()`` whose run still ends with RIP at the block it stops at."""
    sync_pc_on_exit(uc)
    uc.emu_stop()


@functools.cache
def soft_stop_selftest() -> None:
    """Check once per process: a soft stop ends the run after the block, CPUID and SYSCALL still ours.

    The block ``out; cpuid; syscall`` with a soft stop at the OUT: both
    later hooks run (the CPUID hook is registered first, so a visible
    ``stop_request`` would end the SYSCALL hook loop before the SYSCALL
    hook), and the run ends where the SYSCALL hook sent RIP.
    """
    from unicorn import UcError
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0, 0x4000)
    # 0x1000: out 0x80, al ; cpuid ; syscall ; hlt      0x1010: hlt
    uc.mem_write(0x1000, bytes.fromhex("e680" "0fa2" "0f05" "f4"))
    uc.mem_write(0x1010, b"\xf4")
    seen = []
    uc.hook_add(UC_HOOK_INSN, lambda u, _: (seen.append("cpuid"), u.reg_write(X.UC_X86_REG_RAX, 0x77))[-1] or 1,
                None, 1, 0, X.UC_X86_INS_CPUID)
    uc.hook_add(UC_HOOK_INSN, lambda u, _: (seen.append("syscall"), u.reg_write(X.UC_X86_REG_RIP, 0x1010 - 2)),
                None, 1, 0, X.UC_X86_INS_SYSCALL)
    uc.hook_add(UC_HOOK_INSN, lambda u, port, size, value, _: soft_stop(u), None, 1, 0, X.UC_X86_INS_OUT)
    stop_between_blocks(uc)
    err = None
    try:
        uc.emu_start(0x1000, 0x1011)
    except UcError as e:
        err = e.errno
    if err != SOFT_STOP or seen != ["cpuid", "syscall"] or uc.reg_read(X.UC_X86_REG_RIP) != 0x1010 \
            or uc.reg_read(X.UC_X86_REG_RAX) != 0x77:
        raise FlagNotFound("Unicorn's stop fields are not where unicorn 2.1.4 keeps them; install unicorn==2.1.4")
    # skip_sync_pc_on_exit: set by a RIP write, cleared by emu_start
    flag = ctypes.c_uint8.from_address(_handle(uc) + offset() + SKIP_SYNC_FROM_NO_EXIT_REQUEST)
    uc.reg_write(X.UC_X86_REG_RIP, 0x1010)
    was_set = flag.value
    uc.emu_start(0x1010, 0x1011)
    if was_set != 1 or flag.value != 0:
        raise FlagNotFound("Unicorn's skip_sync_pc_on_exit is not where unicorn 2.1.4 keeps it; "
                           "install unicorn==2.1.4")
