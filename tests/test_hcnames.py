"""Hypercall sub-operation names (xenicorn/xen/hcnames.py) as ``--trace hypercalls`` prints them."""
import pytest

from xenicorn.xen import hcnames
from xenicorn.xen.guest import GuestFault
from xenicorn.xen.hypercall import HYPERCALL_NAMES


@pytest.mark.parametrize("call,cmd,name", [
    ("event_channel_op", 4, "EVTCHNOP_send"),
    ("event_channel_op", 11, "EVTCHNOP_init_control"),
    ("memory_op", 6, "XENMEM_populate_physmap"),
    ("memory_op", 28, "XENMEM_acquire_resource"),
    ("hvm_op", 23, "HVMOP_set_evtchn_upcall_vector"),
    ("grant_table_op", 9, "GNTTABOP_get_status_frames"),
    ("sched_op", 3, "SCHEDOP_poll"),
    ("vcpu_op", 10, "VCPUOP_register_vcpu_info"),
    ("xen_version", 6, "XENVER_get_features"),
    ("physdev_op", 21, "PHYSDEVOP_setup_gsi"),
    ("console_io", 0, "CONSOLEIO_write"),
    ("vm_assist", 1, "VMASST_CMD_disable"),
    ("callback_op", 0, "CALLBACKOP_register"),
    ("nmi_op", 1, "XENNMI_unregister_callback"),
    ("argo_op", 3, "XEN_ARGO_OP_sendv"),
    ("xenpmu_op", 4, "XENPMU_init"),
    ("hypfs_op", 1, "XEN_HYPFS_OP_read"),
    ("kexec_op", 6, "KEXEC_CMD_kexec_status"),
])
def test_each_multiplexed_hypercall_names_its_commands(call, cmd, name):
    assert call in HYPERCALL_NAMES.values()
    assert hcnames.subop(call, cmd) == name


def test_continuation_bits_and_unknown_commands():
    # memory_op keeps the extent to restart at above bit 6, grant_table_op above bit 12
    assert hcnames.subop("memory_op", (5 << 6) | 6) == "XENMEM_populate_physmap|0x140"
    assert hcnames.subop("grant_table_op", (3 << 12) | 5) == "GNTTABOP_copy|0x3000"
    assert hcnames.subop("event_channel_op", 99) == "EVTCHNOP 99"
    assert hcnames.subop("set_timer_op", 0) is None


def test_describe_reads_the_hvm_param_index_and_survives_a_bad_pointer():
    memory = {0x1004: 18}

    def read_u32(addr):
        if addr not in memory:
            raise GuestFault(addr, 4, "not RAM")
        return memory[addr]
    assert (hcnames.describe("hvm_op", (0, 0x1000, 0), read_u32)
            == "HVMOP_set_param[HVM_PARAM_CONSOLE_EVTCHN], 0x1000, 0x0")
    assert hcnames.describe("hvm_op", (1, 0xdead, 0), read_u32) == "HVMOP_get_param, 0xdead, 0x0"
    assert hcnames.describe("vm_assist", (0, 32, 0)) == "VMASST_CMD_enable, VMASST_TYPE_m2p_strict, 0x0"
    assert hcnames.describe("set_timer_op", (0x10, 0, 0)) == "0x10, 0x0, 0x0"


def test_commands_behind_a_pointer_are_read_from_guest_memory():
    memory = {0x2000: 5, 0x3000: 0x4000, 0x3004: 0, 0x4000: 20, 0x5000: 99}

    def read_u32(addr):
        if addr not in memory:
            raise GuestFault(addr, 4, "not RAM")
        return memory[addr]
    assert hcnames.describe("domctl", (0x2000, 0, 0), read_u32) == "0x2000[XEN_DOMCTL_getdomaininfo], 0x0, 0x0"
    assert hcnames.describe("sysctl", (0x5000, 0, 0), read_u32) == "0x5000[XEN_SYSCTL 99], 0x0, 0x0"
    assert hcnames.describe("platform_op", (0xbad, 0, 0), read_u32) == "0xbad, 0x0, 0x0"       # bad pointer
    assert hcnames.describe("dm_op", (1, 1, 0x3000), read_u32) == "0x1, 0x1, 0x3000[XEN_DMOP_nr_vcpus]"
    assert hcnames.describe("mmuext_op", (0x2000, 1, 0), read_u32) == "0x2000[MMUEXT_NEW_BASEPTR], 0x1, 0x0"
    assert hcnames.describe("sched_op_compat", (2, 0, 0), read_u32) == "SCHEDOP_shutdown, 0x0, 0x0"


def test_the_xenabi_guest_trace_names_the_management_commands(capsys):
    from test_firmware import run
    _, _, status, _ = run("xenabi64", trace={"hypercalls"})
    err = capsys.readouterr().err
    assert status == 0
    for text in ("[XEN_DOMCTL_getdomaininfo], ", "[XEN_SYSCTL_readconsole], ", "[XENPF_get_cpu_version], ",
                 "sched_op_compat(SCHEDOP_yield, "):
        assert text in err, text
