"""The names of every hypercall's sub-operations, for ``--trace hypercalls``.

Most Xen hypercalls are multiplexers: the first argument is a command
(``event_channel_op(EVTCHNOP_send, &port)``, ``memory_op(XENMEM_populate_physmap,
&reservation)``) and the second points at the command's structure. A trace
that prints ``event_channel_op(0x4, ...)`` makes a reader look the number
up; this table does it for them.

The numbers were copied by hand from Xen's public headers (xen-project/xen
at c447b7308b, xen/include/public/): event_channel.h (EVTCHNOP_*),
memory.h (XENMEM_*), hvm/hvm_op.h (HVMOP_*), hvm/params.h (HVM_PARAM_*),
grant_table.h (GNTTABOP_*), sched.h (SCHEDOP_*), vcpu.h (VCPUOP_*),
version.h (XENVER_*), physdev.h (PHYSDEVOP_*), xen.h (CONSOLEIO_*,
VMASST_CMD_*, VMASST_TYPE_*), callback.h (CALLBACKOP_*), nmi.h (XENNMI_*),
argo.h (XEN_ARGO_OP_*), pmu.h (XENPMU_*), hypfs.h (XEN_HYPFS_OP_*) and
kexec.h (KEXEC_CMD_*). Two commands carry more than the command in their
first argument, for hypercall continuations: ``memory_op`` keeps the
extent to restart at above bit 6 (MEMOP_EXTENT_SHIFT, xen/include/xen/
hypercall.h), ``grant_table_op`` above bit 12 (GNTTABOP_CONTINUATION_ARG_SHIFT,
xen/common/grant_table.c); the name is the command's, and the rest is shown.

``platform_op``, ``sysctl``, ``domctl``, ``dm_op``, ``mmuext_op`` and the
``*_compat`` calls take a pointer: their command is read from the structure
it points at (domctl.h, sysctl.h, platform.h, hvm/dm_op.h, xen.h MMUEXT_*)
and shown after it, ``domctl(0x10ff00[XEN_DOMCTL_getdomaininfo], ...)``.
``multicall`` is a list of calls, each traced by itself; ``set_timer_op``,
``iret``, ``stack_switch`` and the other PV-only calls have no command.
"""
from __future__ import annotations

from .guest import HypercallError

EVTCHNOP = ("bind_interdomain", "bind_virq", "bind_pirq", "close", "send", "status", "alloc_unbound",
            "bind_ipi", "bind_vcpu", "unmask", "reset", "init_control", "expand_array", "set_priority",
            "reset_cont")
XENMEM = {0: "increase_reservation", 1: "decrease_reservation", 2: "maximum_ram_page",
          3: "current_reservation", 4: "maximum_reservation", 5: "machphys_mfn_list", 6: "populate_physmap",
          7: "add_to_physmap", 9: "memory_map", 10: "machine_memory_map", 11: "exchange",
          12: "machphys_mapping", 13: "set_memory_map", 14: "maximum_gpfn", 15: "remove_from_physmap",
          16: "set_pod_target", 17: "get_pod_target", 18: "get_sharing_freed_pages",
          19: "get_sharing_shared_pages", 20: "paging_op", 21: "access_op", 22: "sharing_op",
          23: "add_to_physmap_batch", 24: "claim_pages", 25: "machphys_compat_mfn_list", 26: "get_vnumainfo",
          27: "reserved_device_memory_map", 28: "acquire_resource"}
HVMOP = {0: "set_param", 1: "get_param", 2: "set_pci_intx_level", 3: "set_isa_irq_level",
         4: "set_pci_link_route", 5: "flush_tlbs", 9: "pagetable_dying", 10: "get_time", 11: "xentrace",
         12: "set_mem_access", 13: "get_mem_access", 15: "get_mem_type", 23: "set_evtchn_upcall_vector",
         24: "guest_request_vm_event", 25: "altp2m"}
HVM_PARAM = {0: "CALLBACK_IRQ", 1: "STORE_PFN", 2: "STORE_EVTCHN", 4: "PAE_ENABLED", 5: "IOREQ_PFN",
             6: "BUFIOREQ_PFN", 9: "VIRIDIAN", 10: "TIMER_MODE", 11: "HPET_ENABLED", 12: "IDENT_PT",
             13: "DM_DOMAIN", 14: "ACPI_S_STATE", 15: "VM86_TSS", 16: "VPT_ALIGN", 17: "CONSOLE_PFN",
             18: "CONSOLE_EVTCHN", 19: "ACPI_IOPORTS_LOCATION", 20: "MEMORY_EVENT_CR0", 21: "MEMORY_EVENT_CR3",
             22: "MEMORY_EVENT_CR4", 23: "MEMORY_EVENT_INT3", 24: "NESTEDHVM", 25: "MEMORY_EVENT_SINGLE_STEP",
             26: "BUFIOREQ_EVTCHN", 27: "PAGING_RING_PFN", 28: "MONITOR_RING_PFN", 29: "SHARING_RING_PFN",
             30: "MEMORY_EVENT_MSR", 31: "TRIPLE_FAULT_REASON", 32: "IOREQ_SERVER_PFN",
             33: "NR_IOREQ_SERVER_PAGES", 34: "VM_GENERATION_ID_ADDR", 35: "ALTP2M", 36: "X87_FIP_WIDTH",
             37: "VM86_TSS_SIZED", 38: "MCA_CAP"}
GNTTABOP = ("map_grant_ref", "unmap_grant_ref", "setup_table", "dump_table", "transfer", "copy", "query_size",
            "unmap_and_replace", "set_version", "get_status_frames", "get_version")
SCHEDOP = ("yield", "block", "shutdown", "poll", "remote_shutdown", "shutdown_code", "watchdog", "pin_override")
VCPUOP = ("initialise", "up", "down", "is_up", "get_runstate_info", "register_runstate_memory_area",
          "set_periodic_timer", "stop_periodic_timer", "set_singleshot_timer", "stop_singleshot_timer",
          "register_vcpu_info", "send_nmi", "get_physid", "register_vcpu_time_memory_area",
          "register_runstate_phys_area", "register_vcpu_time_phys_area")
XENVER = ("version", "extraversion", "compile_info", "capabilities", "changeset", "platform_parameters",
          "get_features", "pagesize", "guest_handle", "commandline", "build_id", "extraversion2",
          "capabilities2", "changeset2", "commandline2")
PHYSDEVOP = {5: "irq_status_query", 6: "set_iopl", 7: "set_iobitmap", 8: "apic_read", 9: "apic_write",
             10: "alloc_irq_vector", 11: "free_irq_vector", 12: "eoi", 13: "map_pirq", 14: "unmap_pirq",
             15: "manage_pci_add", 16: "manage_pci_remove", 17: "pirq_eoi_gmfn_v1", 19: "restore_msi",
             20: "manage_pci_add_ext", 21: "setup_gsi", 23: "get_free_pirq", 24: "pci_mmcfg_reserved",
             25: "pci_device_add", 26: "pci_device_remove", 27: "restore_msi_ext", 28: "pirq_eoi_gmfn_v2",
             29: "dbgp_op", 30: "prepare_msix", 31: "release_msix", 32: "pci_device_reset"}
CONSOLEIO = ("write", "read")
VMASST_CMD = ("enable", "disable")
# VMASST_TYPE_* (xen.h): the second argument of vm_assist
VMASST_TYPE = {0: "4gb_segments", 1: "4gb_segments_notify", 2: "writable_pagetables", 3: "pae_extended_cr3",
               4: "architectural_iopl", 5: "runstate_update_flag", 32: "m2p_strict"}
CALLBACKOP = ("register", "unregister")
XENNMI = ("register_callback", "unregister_callback")
ARGO_OP = {1: "register_ring", 2: "unregister_ring", 3: "sendv", 4: "notify"}
XENPMU = ("mode_get", "mode_set", "feature_get", "feature_set", "init", "finish", "lvtpc_set", "flush")
HYPFS_OP = ("get_version", "read", "write_contents")
KEXEC_CMD = ("kexec", "kexec_load_v1", "kexec_unload_v1", "kexec_get_range", "kexec_load", "kexec_unload",
             "kexec_status")

MMUEXT = {0: "PIN_L1_TABLE", 1: "PIN_L2_TABLE", 2: "PIN_L3_TABLE", 3: "PIN_L4_TABLE", 4: "UNPIN_TABLE",
          5: "NEW_BASEPTR", 6: "TLB_FLUSH_LOCAL", 7: "INVLPG_LOCAL", 8: "TLB_FLUSH_MULTI", 9: "INVLPG_MULTI",
          10: "TLB_FLUSH_ALL", 11: "INVLPG_ALL", 12: "FLUSH_CACHE", 13: "SET_LDT", 15: "NEW_USER_BASEPTR",
          16: "CLEAR_PAGE", 17: "COPY_PAGE", 18: "FLUSH_CACHE_GLOBAL", 19: "MARK_SUPER", 20: "UNMARK_SUPER"}
# the management hypercalls' commands (domctl.h, sysctl.h, platform.h, hvm/dm_op.h): a domU is
# refused them (:mod:`.denials`), but a guest may try, and the trace names what it tried
DOMCTL = {1: "createdomain", 2: "destroydomain", 3: "pausedomain", 4: "unpausedomain", 5: "getdomaininfo",
          9: "setvcpuaffinity", 10: "shadow_op", 11: "max_mem", 12: "setvcpucontext", 13: "getvcpucontext",
          14: "getvcpuinfo", 15: "max_vcpus", 16: "scheduler_op", 17: "setdomainhandle", 18: "setdebugging",
          19: "irq_permission", 20: "iomem_permission", 21: "ioport_permission", 22: "hypercall_init",
          23: "soft_reset_cont", 24: "settimeoffset", 25: "getvcpuaffinity", 26: "real_mode_area",
          27: "resumedomain", 28: "sendtrigger", 29: "subscribe", 33: "gethvmcontext", 34: "sethvmcontext",
          35: "set_address_size", 36: "get_address_size", 37: "assign_device", 38: "bind_pt_irq",
          39: "memory_mapping", 40: "ioport_mapping", 42: "set_ext_vcpucontext", 43: "get_ext_vcpucontext",
          44: "set_opt_feature", 45: "test_assign_device", 46: "set_target", 47: "deassign_device",
          48: "unbind_pt_irq", 50: "get_device_group", 54: "debug_op", 55: "gethvmcontext_partial",
          56: "vm_event_op", 57: "mem_sharing_op", 59: "gettscinfo", 60: "settscinfo", 61: "getpageframeinfo3",
          62: "setvcpuextstate", 63: "getvcpuextstate", 64: "set_access_required", 65: "audit_p2m",
          66: "set_virq_handler", 67: "set_broken_page_p2m", 68: "setnodeaffinity", 69: "getnodeaffinity",
          71: "cacheflush", 72: "get_vcpu_msrs", 73: "set_vcpu_msrs", 74: "setvnumainfo", 75: "psr_cmt_op",
          77: "monitor_op", 78: "psr_alloc", 79: "soft_reset", 81: "vuart_op", 82: "get_cpu_policy",
          83: "set_cpu_policy", 84: "vmtrace_op", 85: "get_paging_mempool_size", 86: "set_paging_mempool_size",
          87: "dt_overlay", 88: "gsi_permission", 89: "set_llc_colors", 90: "get_domain_state",
          1000: "gdbsx_guestmemio", 1001: "gdbsx_pausevcpu", 1002: "gdbsx_unpausevcpu", 1003: "gdbsx_domstatus"}
SYSCTL = {1: "readconsole", 2: "tbuf_op", 3: "physinfo", 4: "sched_id", 5: "perfc_op", 6: "getdomaininfolist",
          7: "debug_keys", 8: "getcpuinfo", 9: "availheap", 10: "get_pmstat", 11: "cpu_hotplug", 12: "pm_op",
          14: "page_offline_op", 15: "lockprof_op", 16: "cputopoinfo", 17: "numainfo", 18: "cpupool_op",
          19: "scheduler_op", 20: "coverage_op", 21: "psr_cmt_op", 22: "pcitopoinfo", 23: "psr_alloc",
          26: "get_cpu_featureset", 27: "livepatch_op", 29: "get_cpu_policy", 30: "dt_overlay"}
XENPF = {17: "settime32", 31: "add_memtype", 32: "del_memtype", 33: "read_memtype", 35: "microcode_update",
         39: "platform_quirk", 48: "get_cpu_version", 49: "efi_runtime_call", 50: "firmware_info",
         51: "enter_acpi_sleep", 52: "change_freq", 53: "getidletime", 54: "set_processor_pminfo",
         55: "get_cpuinfo", 56: "cpu_online", 57: "cpu_offline", 58: "cpu_hotadd", 59: "mem_hotadd",
         60: "core_parking", 61: "resource_op", 62: "settime64", 63: "get_symbol", 64: "get_dom0_console",
         65: "get_ucode_revision", 66: "microcode_update2"}
DMOP = {1: "create_ioreq_server", 2: "get_ioreq_server_info", 3: "map_io_range_to_ioreq_server",
        4: "unmap_io_range_from_ioreq_server", 5: "set_ioreq_server_state", 6: "destroy_ioreq_server",
        7: "track_dirty_vram", 8: "set_pci_intx_level", 9: "set_isa_irq_level", 10: "set_pci_link_route",
        11: "modified_memory", 12: "set_mem_type", 13: "inject_event", 14: "inject_msi",
        15: "map_mem_type_to_ioreq_server", 16: "remote_shutdown", 17: "relocate_memory",
        18: "pin_memory_cacheattr", 19: "set_irq_level", 20: "nr_vcpus"}

MEMOP_EXTENT_SHIFT = 6
GNTTABOP_CONTINUATION_ARG_SHIFT = 12


def _table(names) -> dict[int, str]:
    return dict(enumerate(names)) if isinstance(names, tuple) else names


# hypercall name -> (prefix, table, bits of the first argument that are the command)
SUBOPS: dict[str, tuple[str, dict[int, str], int]] = {
    "event_channel_op": ("EVTCHNOP_", _table(EVTCHNOP), 32),
    "memory_op": ("XENMEM_", XENMEM, MEMOP_EXTENT_SHIFT),
    "hvm_op": ("HVMOP_", HVMOP, 32),
    "grant_table_op": ("GNTTABOP_", _table(GNTTABOP), GNTTABOP_CONTINUATION_ARG_SHIFT),
    "sched_op": ("SCHEDOP_", _table(SCHEDOP), 32),
    "vcpu_op": ("VCPUOP_", _table(VCPUOP), 32),
    "xen_version": ("XENVER_", _table(XENVER), 32),
    "physdev_op": ("PHYSDEVOP_", PHYSDEVOP, 32),
    "console_io": ("CONSOLEIO_", _table(CONSOLEIO), 32),
    "vm_assist": ("VMASST_CMD_", _table(VMASST_CMD), 32),
    "callback_op": ("CALLBACKOP_", _table(CALLBACKOP), 32),
    "nmi_op": ("XENNMI_", _table(XENNMI), 32),
    "argo_op": ("XEN_ARGO_OP_", ARGO_OP, 32),
    "xenpmu_op": ("XENPMU_", _table(XENPMU), 32),
    "hypfs_op": ("XEN_HYPFS_OP_", _table(HYPFS_OP), 32),
    "kexec_op": ("KEXEC_CMD_", _table(KEXEC_CMD), 32),
}


# hypercalls whose command is the first uint32 of the structure the first argument points at:
# xen_domctl, xen_sysctl, xen_platform_op (cmd, interface_version, ...), mmuext_op (the first op of
# the array), and the pre-3.0 evtchn_op / physdev_op ({cmd; union}) of the *_compat calls
POINTED: dict[str, tuple[str, dict[int, str]]] = {
    "domctl": ("XEN_DOMCTL_", DOMCTL),
    "sysctl": ("XEN_SYSCTL_", SYSCTL),
    "platform_op": ("XENPF_", XENPF),
    "mmuext_op": ("MMUEXT_", MMUEXT),
    "event_channel_op_compat": ("EVTCHNOP_", _table(EVTCHNOP)),
    "physdev_op_compat": ("PHYSDEVOP_", PHYSDEVOP),
}
SUBOPS["sched_op_compat"] = ("SCHEDOP_", _table(SCHEDOP), 32)


def _named(prefix: str, table: dict[int, str], op: int) -> str:
    return prefix + table[op] if op in table else f"{prefix.rstrip('_')} {op}"


def subop(hypercall: str, cmd: int) -> str | None:
    """``EVTCHNOP_send`` for ``("event_channel_op", 4)``; None for a call without sub-operations.

    A command Xen does not define is shown by number (``EVTCHNOP 99``); bits above
    the command (a continuation's restart point) follow as ``|0x...``.
    """
    entry = SUBOPS.get(hypercall)
    if entry is None:
        return None
    prefix, table, bits = entry
    mask = (1 << bits) - 1
    op, rest = cmd & mask, cmd & ~mask
    text = _named(prefix, table, op)
    return f"{text}|{rest:#x}" if rest else text


def param_name(index: int) -> str:
    """``HVM_PARAM_CALLBACK_IRQ`` for 0 (hvm/params.h); the number for one Xen does not define."""
    name = HVM_PARAM.get(index)
    return f"HVM_PARAM_{name}" if name else f"HVM_PARAM {index}"


def describe(hypercall: str, args: tuple[int, ...], read_u32=None) -> str:
    """The argument list as the trace shows it: the command by name, then the other arguments.

    ``read_u32(linear)`` reads the guest's memory; with it, ``HVMOP_set_param``
    and ``HVMOP_get_param`` name the parameter (``xen_hvm_param``'s index, a
    uint32 at offset 4 after domid and pad, hvm/hvm_op.h) and the calls that
    name one vCPU or one VIRQ keep their numbers, as plain arguments.
    """
    shown = [f"{a:#x}" for a in args[:3]]
    if hypercall in POINTED or hypercall == "dm_op":
        pointed = _pointed(hypercall, args, read_u32) if read_u32 is not None else None
        return ", ".join(pointed or shown)
    name = subop(hypercall, args[0]) if args else None
    if name is None:
        return ", ".join(shown)
    if hypercall == "vm_assist" and len(args) > 1:
        kind = VMASST_TYPE.get(args[1])
        shown[1] = f"VMASST_TYPE_{kind}" if kind else shown[1]
    if hypercall == "hvm_op" and args[0] in (0, 1) and read_u32 is not None and len(args) > 1:
        try:
            name += f"[{param_name(read_u32(args[1] + 4))}]"
        except HypercallError:                     # a bad pointer: the handler's note says so
            pass
    return ", ".join([name] + shown[1:])


def _pointed(hypercall: str, args: tuple[int, ...], read_u32) -> list[str] | None:
    """The arguments of a call whose command is in guest memory, the command named after its pointer.

    ``dm_op(domid, nr_bufs, bufs)``: the command is the first uint32 of the
    first buffer (xen_dm_op.op), whose 64-bit handle starts ``bufs[0]``
    (hvm/dm_op.h xen_dm_op_buf).
    """
    shown = [f"{a:#x}" for a in args[:3]]
    try:
        if hypercall in POINTED and args:
            prefix, table = POINTED[hypercall]
            shown[0] += f"[{_named(prefix, table, read_u32(args[0]))}]"
        elif hypercall == "dm_op" and len(args) > 2 and args[1]:
            buf = read_u32(args[2]) | read_u32(args[2] + 4) << 32
            shown[2] += f"[{_named('XEN_DMOP_', DMOP, read_u32(buf))}]"
        else:
            return None
    except HypercallError:                         # a bad pointer: shown as it is, the handler says why
        pass
    return shown
