"""The xenstore kernels: PV console, the xenstore ring protocol, a grant read by dom0."""
import pytest

from xenicorn import firmware
from xenicorn.devices.console import ConsoleSink
from xenicorn.machine.machine import MachineConfig
from xenicorn.boot import boot
from xenicorn.xen.gnttab import GrantError, GNTST_general_error, GTF_readonly, GTF_permit_access


def run(name, seed=()):
    machine, _ = boot(MachineConfig(debugcon="none"), firmware.find(name), console=ConsoleSink(None))
    for path, value in seed:
        machine.xen.xenstore_write(path, value)
    status = machine.run()
    return machine, status, machine.console.text()


@pytest.mark.parametrize("bits", [32, 64])
def test_xenstore_kernel_speaks_the_protocol_and_shares_a_page(bits):
    machine, status, text = run(f"xenstore{bits}", [("/local/domain/1/control/shutdown", b"poweroff")])
    assert status == 0 and text.rstrip().endswith("Test result: SUCCESS"), text
    assert "hello from the PV console\n" in text and machine.xen.pvconsole.received == 26
    assert "the toolstack asks for poweroff" in text
    st = machine.xen.store
    assert st.read(0, "/local/domain/1/data/hello") == b"world"
    assert st.read(0, "/local/domain/1/data/counter") == b"8"          # the retried transaction won
    assert not st.transactions                                          # none left open
    assert ("/local/domain/1/data/watched", "tok") in [(w[1], w[2]) for w in st.watches]
    assert machine.xen.xenstore.requests >= 20 and not machine.xen.xenstore.broken
    # dom0 reads the page the guest granted, through the reference it published
    ref = int(st.read(0, "/local/domain/1/data/grant-ref"))
    gt = machine.xen.gnttab
    assert gt.entry(ref)[0] == GTF_permit_access | GTF_readonly
    assert gt.read(ref, 0, 19) == b"shared by the guest"
    with pytest.raises(GrantError) as e:
        gt.write(ref, 0, b"no")
    assert e.value.code == GNTST_general_error                         # read-only (Xen's _set_status)


def test_the_cli_seeds_keys_and_traces_messages(capsys):
    from xenicorn.cli import main
    assert main(["run", "xenstore64", "--xenstore", "control/shutdown=poweroff", "--trace", "xenstore"]) == 0
    out = capsys.readouterr()
    assert "the toolstack asks for poweroff" in out.out
    assert "hello from the PV console\n" in out.out                  # the PV console reaches stdout
    assert "[xenstore] <- TRANSACTION_END req" in out.err and "EAGAIN" in out.err
    assert main(["run", "xenstore64", "--xenstore", "novalue"]) == 2


def test_stdin_reaches_the_guest_through_the_pv_console():
    import subprocess
    import sys
    res = subprocess.run([sys.executable, "-m", "xenicorn", "run", "xenstore64", "--append", "echo",
                          "--console-input", "stdin"], input=b"ping\n", capture_output=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert b"console input: ping\n" in res.stdout


def test_host_side_watch_sees_the_guests_writes(capsys):
    from xenicorn.cli import main
    assert main(["run", "xenstore64", "--xenstore-watch", "data/counter"]) == 0
    err = capsys.readouterr().err
    seen = [line.split(" = ")[1] for line in err.splitlines() if line.startswith("xenstore-watch:")]
    assert seen == ["1", "7", "8"]                       # the failed transaction's "2" never showed
