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

``platform_op``, ``sysctl``, ``domctl``, ``dm_op``, ``mmuext_op``,
``multicall`` and ``*_compat`` calls take a pointer first: their command is
inside a structure, and a domU is refused them anyway (:mod:`.denials`).
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
    text = prefix + table[op] if op in table else f"{prefix.rstrip('_')} {op}"
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
