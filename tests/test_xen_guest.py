"""The xencore kernels: the Xen core exercised by a guest, 32- and 64-bit."""
import pytest

from test_firmware import run


@pytest.mark.parametrize("name,bits", [("xencore32", 32), ("xencore64", 64)])
def test_xencore_guest_passes_and_leaves_the_expected_state(name, bits):
    machine, kernel, status, text = run(name)
    assert "FAIL" not in text, text
    assert text.rstrip().endswith("Test result: SUCCESS")
    assert status == 0 and machine.shutdown_reason == "poweroff"
    assert "SCHEDOP_shutdown(poweroff)" in machine.shutdown_message
    assert "console_io" not in text                             # not the guest's console: Xen's log
    assert machine.xen_log.text() == "(d1) hello through console_io\n"
    xen = machine.xen
    sym = kernel.symbols
    st = xen.state
    assert st.width == bits
    assert st.hypercall_page == sym["hypercall_page"]
    assert st.shared_info_gpa == sym["shared_page"]
    assert xen.vcpu_state(0).vcpu_info_gpa == sym["vcpu_page"] + 0x80
    assert st.params[0] == (2 << 56) | 0xF3
    assert st.upcall_vectors == {0: 0xF2}
    assert xen.vcpu_state(0).periodic_ns == 0 and not st.ballooned
    # the page populate_physmap replaced stays counted, and in 64-bit the one allocated for a gfn
    # the p2m then refused (xen/memory.py _populate)
    assert st.pages == machine.memory.size // 4096 + (2 if bits == 64 else 1)
    assert not machine.memory.extra                            # gfn 0xfffff was given back
    # the MSR window opened at CPUID 0x40000002 and closed at the MSR write
    assert machine.exit_counts["Msr"] == 1 and not machine.vcpu.msr.is_open
    counts = xen.hypercall_counts
    for name_ in ("xen_version", "console_io", "memory_op", "hvm_op", "vcpu_op", "sched_op"):
        assert counts.get(name_, 0) >= 2, counts
    # one check per line, nothing skipped
    assert text.count("\nok ") >= 55


def test_trace_hypercalls_decodes_each_call(capsys):
    machine, _, status, _ = run("xencore64", trace={"hypercalls"})
    err = capsys.readouterr().err
    assert status == 0
    assert "[hypercalls] hypercall page installed at" in err
    assert "memory_op(XENMEM_add_to_physmap, 0x" in err and "[shared_info at" in err
    assert ("hvm_op(HVMOP_set_param[HVM_PARAM_CALLBACK_IRQ], 0x" in err
            and "set CALLBACK_IRQ = 0x2000000000000f3" in err)
    assert "= -EPERM" in err and "= -EFAULT" in err and "= -ENOSYS" in err
    for sub in ("XENVER_version", "XENVER_get_features", "CONSOLEIO_write", "XENMEM_populate_physmap",
                "XENMEM_decrease_reservation", "VCPUOP_register_vcpu_info", "SCHEDOP_shutdown"):
        assert f"({sub}" in err, sub
    # a command the guest made up is shown by number, its continuation bits apart
    assert "xen_version(XENVER 77, " in err and "memory_op(XENMEM 35|0x40, " in err
    # no multiplexed call is left with a bare number for its command
    from xenicorn.xen.hcnames import SUBOPS
    for line in err.splitlines():
        call = line.removeprefix("[hypercalls] ").split("(")[0]
        if call in SUBOPS:
            assert not line.split("(", 1)[1].startswith("0x"), line
