"""``xen_version`` (hypercall 17): who is the hypervisor, what can it do.

Sub-ops from xen/include/public/version.h. Strings are copied into
fixed-size guest buffers, NUL padded, exactly as Xen's ``copy_to_guest`` of
the whole array does.

=====  ==========================  ==========================================
cmd    name                        answer
=====  ==========================  ==========================================
0      XENVER_version              (major << 16) | minor, no argument
1      XENVER_extraversion         char[16]
2      XENVER_compile_info         compiler[64], by[16], domain[32], date[32]
3      XENVER_capabilities         char[1024], e.g. "hvm-3.0-x86_64 ..."
4      XENVER_changeset            char[64]
5      XENVER_platform_parameters  { unsigned long virt_start }
6      XENVER_get_features         { uint submap_idx; uint32 submap } in/out
7      XENVER_pagesize             4096, no argument
8      XENVER_guest_handle         the domain's 16-byte handle (UUID)
9      XENVER_commandline          privileged only: -EPERM for a guest
10     XENVER_build_id             privileged only: -EPERM for a guest
=====  ==========================  ==========================================
"""
from __future__ import annotations

from . import errno
from .guest import HypercallError

XENVER_version, XENVER_extraversion, XENVER_compile_info, XENVER_capabilities = 0, 1, 2, 3
XENVER_changeset, XENVER_platform_parameters, XENVER_get_features, XENVER_pagesize = 4, 5, 6, 7
XENVER_guest_handle, XENVER_commandline, XENVER_build_id = 8, 9, 10

# XENFEAT_* bit numbers (xen/include/public/features.h)
XENFEAT_writable_page_tables = 0
XENFEAT_auto_translated_physmap = 2
XENFEAT_hvm_callback_vector = 8
XENFEAT_hvm_safe_pvclock = 9
XENFEAT_hvm_pirqs = 10

# HYPERVISOR_VIRT_START for 64-bit guests and the compat (32-bit) value.
VIRT_START_64 = 0xFFFF800000000000
VIRT_START_32 = 0xF5800000

SUBOPS = {XENVER_version: "version", XENVER_extraversion: "extraversion",
          XENVER_compile_info: "compile_info", XENVER_capabilities: "capabilities",
          XENVER_changeset: "changeset", XENVER_platform_parameters: "platform_parameters",
          XENVER_get_features: "get_features", XENVER_pagesize: "pagesize",
          XENVER_guest_handle: "guest_handle", XENVER_commandline: "commandline",
          XENVER_build_id: "build_id"}


def _string(text: str, size: int) -> bytes:
    raw = text.encode()[: size - 1]
    return raw + b"\0" * (size - len(raw))


def xen_version(call, cmd: int, arg: int, *_) -> int:
    """Answer one XENVER_* query (see the module table)."""
    xen = call.xen
    call.note(SUBOPS.get(cmd, f"cmd {cmd}"))
    if cmd == XENVER_version:
        major, minor = xen.config.version
        return (major << 16) | minor
    if cmd == XENVER_pagesize:
        return 4096
    if cmd == XENVER_extraversion:
        call.guest.write(arg, _string(xen.config.extraversion, 16))
        return 0
    if cmd == XENVER_compile_info:
        info = (_string("xenicorn (Python)", 64) + _string("xenicorn", 16)
                + _string("localdomain", 32) + _string("Tue Nov 24 00:00:00 UTC 2026", 32))
        call.guest.write(arg, info)
        return 0
    if cmd == XENVER_capabilities:
        call.guest.write(arg, _string("hvm-3.0-x86_32 hvm-3.0-x86_32p hvm-3.0-x86_64", 1024))
        return 0
    if cmd == XENVER_changeset:
        call.guest.write(arg, _string("xenicorn", 64))
        return 0
    if cmd == XENVER_platform_parameters:
        if call.long_mode:
            call.guest.write_struct(arg, "<Q", VIRT_START_64)
        else:
            call.guest.write_struct(arg, "<I", VIRT_START_32)
        return 0
    if cmd == XENVER_get_features:
        idx, _ = call.guest.read_struct(arg, "<II")
        submap = xen.feature_submap() if idx == 0 else 0
        if idx != 0:
            # Xen answers -EINVAL for a submap index beyond XENFEAT_NR_SUBMAPS (1).
            raise HypercallError(errno.EINVAL, f"submap_idx {idx}")
        call.guest.write_struct(arg, "<II", idx, submap)
        return 0
    if cmd == XENVER_guest_handle:
        call.guest.write(arg, xen.config.handle)
        return 0
    if cmd in (XENVER_commandline, XENVER_build_id):
        raise HypercallError(errno.EPERM, "privileged sub-op")
    xen.unimplemented(f"xen_version cmd {cmd}")
    raise HypercallError(errno.ENOSYS)

