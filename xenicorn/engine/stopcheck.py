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
# ``uc_emu_stop()`` sets ``uc_struct.stop_request`` at once, and while it is
# set Unicorn skips instruction hooks (its CPUID, SYSCALL and SYSENTER hook
# loops end early) and block hooks for the rest of the block, which with
# stops between blocks still runs (docs/unicorn-notes.md). A *soft stop*
# keeps the part that ends the run at the next block start (``cpu_exit``,
# inside ``emu_stop``) and takes ``stop_request`` back at once; the run
# then ends because ``invalid_error`` holds a value no Unicorn error has,
# which ``tcg_cpu_exec`` treats as "finish", and ``emu_start`` returns it
# as its error code. The fields sit at fixed distances from the instruction
# counter that :mod:`icount` locates (uc_priv.h of 2.1.4: ``emu_counter``,
# ``emu_count``, ``size_recur_mem``, ``init_tcg``, ``stop_request``, ...,
# ``invalid_addr``, ``invalid_error``); :func:`soft_stop_selftest` checks
# them by behaviour.
SOFT_STOP = 0x5A57                       # emu_start's error code after a soft stop
STOP_REQUEST_FROM_COUNTER = 21
INVALID_ERROR_FROM_COUNTER = 56


def soft_stop(uc: Uc) -> None:
    """End the run at the next block start; hooks still run until then. Safe from any thread."""
    from .icount import field_address
    sync_pc_on_exit(uc)
    ctypes.c_int32.from_address(field_address(uc, INVALID_ERROR_FROM_COUNTER)).value = SOFT_STOP
    uc.emu_stop()
    ctypes.c_uint8.from_address(field_address(uc, STOP_REQUEST_FROM_COUNTER)).value = 0


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
    """Check once per process: a soft stop ends the run after the block, and CPUID is still ours."""
    from unicorn import UcError
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0, 0x4000)
    # out 0x80, al ; cpuid ; jmp L ; L: hlt    (the jmp ends the block)
    uc.mem_write(0x1000, bytes.fromhex("e680" "0fa2" "eb00" "f4"))
    seen = []
    uc.hook_add(UC_HOOK_INSN, lambda u, _: (seen.append("cpuid"), u.reg_write(X.UC_X86_REG_RAX, 0x77))[-1] or 1,
                None, 1, 0, X.UC_X86_INS_CPUID)
    uc.hook_add(UC_HOOK_INSN, lambda u, port, size, value, _: soft_stop(u), None, 1, 0, X.UC_X86_INS_OUT)
    stop_between_blocks(uc)
    err = None
    try:
        uc.emu_start(0x1000, 0x1007)
    except UcError as e:
        err = e.errno
    if err != SOFT_STOP or seen != ["cpuid"] or uc.reg_read(X.UC_X86_REG_RIP) != 0x1006 \
            or uc.reg_read(X.UC_X86_REG_RAX) != 0x77:
        raise FlagNotFound("Unicorn's stop fields are not where unicorn 2.1.4 keeps them; install unicorn==2.1.4")
    # skip_sync_pc_on_exit: set by a RIP write, cleared by emu_start
    flag = ctypes.c_uint8.from_address(_handle(uc) + offset() + SKIP_SYNC_FROM_NO_EXIT_REQUEST)
    uc.reg_write(X.UC_X86_REG_RIP, 0x1006)
    was_set = flag.value
    uc.emu_start(0x1006, 0x1007)
    if was_set != 1 or flag.value != 0:
        raise FlagNotFound("Unicorn's skip_sync_pc_on_exit is not where unicorn 2.1.4 keeps it; "
                           "install unicorn==2.1.4")
