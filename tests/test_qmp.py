"""The QMP monitor, driven by QEMU's own Python client (``qemu.qmp`` from PyPI)."""
import asyncio
import os
import subprocess
import sys
import time

import pytest

qmp = pytest.importorskip("qemu.qmp")


def start(tmp_path, kernel="spin32", *extra):
    sock = str(tmp_path / "qmp.sock")
    proc = subprocess.Popen([sys.executable, "-m", "xenicorn", "run", kernel, "-qmp", f"unix:{sock},server,wait=off",
                             "--timeout", "60", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for _ in range(200):
        if os.path.exists(sock):
            break
        time.sleep(0.05)
    return proc, sock


async def closed(client):
    """Disconnect after "quit": the server has already closed the socket, as QEMU does."""
    try:
        await client.disconnect()
    except EOFError:
        pass


async def session(sock):
    client = qmp.QMPClient("test")
    await client.connect(sock)
    return client


def test_negotiate_status_stop_cont_events_and_quit(tmp_path):
    proc, sock = start(tmp_path)

    async def go():
        client = await session(sock)
        events = []

        async def collect():
            async for ev in client.events:
                events.append(ev["event"])
        task = asyncio.create_task(collect())
        assert (await client.execute("query-status"))["status"] == "running"
        assert await client.execute("stop") == {}
        assert await client.execute("query-status") == {"running": False, "singlestep": False, "status": "paused"}
        assert await client.execute("cont") == {}
        assert (await client.execute("query-status"))["running"] is True
        cpus = await client.execute("query-cpus-fast")
        assert cpus[0]["cpu-index"] == 0 and cpus[0]["target"] == "x86_64"
        ports = await client.execute("xen-event-list")
        assert [p["type"] for p in ports] == ["interdomain", "interdomain"]      # xenstore, PV console
        assert set(ports[0]) == {"port", "vcpu", "type", "remote-domain", "target", "pending", "masked"}
        assert await client.execute("xen-event-inject", {"port": 1}) == {}
        with pytest.raises(qmp.ExecuteError) as e:
            await client.execute("xen-event-inject", {"port": 99})
        assert e.value.error_class == "GenericError"
        with pytest.raises(qmp.ExecuteError) as e:
            await client.execute("no-such-command")
        assert e.value.error_class == "CommandNotFound"
        text = await client.execute("human-monitor-command", {"command-line": "xenstore-read /local/domain/1/name"})
        assert text.strip() == "xenicorn"
        await client.execute("quit")
        await asyncio.sleep(0.2)
        task.cancel()
        await closed(client)
        return events
    events = asyncio.run(go())
    assert proc.wait(timeout=30) == 0
    assert events[:2] == ["STOP", "RESUME"] and "SHUTDOWN" in events
    assert not os.path.exists(sock)


def test_malformed_input_and_a_client_that_vanishes_leave_the_machine_running(tmp_path):
    import json
    import socket
    proc, sock = start(tmp_path)
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock)
    f = s.makefile("rwb")
    assert "QMP" in json.loads(f.readline())
    f.write(b'{"execute": "query-status"}\n')                 # before negotiation
    f.flush()
    assert json.loads(f.readline())["error"]["class"] == "CommandNotFound"
    f.write(b'{"execute": "qmp_capabilities"}\n{"execute": 5}\n{"exec')
    f.flush()
    assert json.loads(f.readline()) == {"return": {}}
    assert json.loads(f.readline())["error"]["class"] == "GenericError"
    f.write(b'ute": "stop", "id": 7}\n')                      # the rest of a split message
    f.flush()
    reply = json.loads(f.readline())
    while "event" in reply:
        reply = json.loads(f.readline())
    assert reply == {"return": {}, "id": 7}
    f.write(b'{"execute": "cont"}\n')                        # and vanish before the reply
    f.flush()
    s.close()
    time.sleep(0.3)

    async def check():
        client = await session(sock)
        status = await client.execute("query-status")
        await client.execute("quit")
        await closed(client)
        return status
    assert asyncio.run(check())["status"] == "running"
    assert proc.wait(timeout=30) == 0


def test_bad_qmp_spec_is_one_line():
    from xenicorn.cli import main
    assert main(["run", "spin32", "-qmp", "tcp:localhost:4444"]) == 2


def test_query_cpus_fast_lists_every_vcpu(tmp_path):
    """-smp 2: one entry per vCPU, one socket each, all run by the machine's one thread."""
    proc, sock = start(tmp_path, "spin32", "-smp", "2")

    async def go():
        client = await session(sock)
        cpus = await client.execute("query-cpus-fast")
        status = await client.execute("query-status")
        await client.execute("quit")
        await closed(client)
        return cpus, status
    cpus, status = asyncio.run(go())
    assert proc.wait(timeout=30) == 0
    assert status == {"running": True, "singlestep": False, "status": "running"}
    assert [c["cpu-index"] for c in cpus] == [0, 1]
    assert [c["qom-path"] for c in cpus] == ["/machine/unattached/device[0]", "/machine/unattached/device[1]"]
    assert [c["props"] for c in cpus] == [{"core-id": 0, "thread-id": 0, "socket-id": i} for i in (0, 1)]
    assert all(c["target"] == "x86_64" for c in cpus)
    assert [c["thread-id"] for c in cpus] == [proc.pid] * 2            # the CLI runs the machine on its main thread


def test_human_monitor_info_commands_and_the_current_cpu(tmp_path):
    """HMP through QMP: ``info`` lists its subcommands, an unknown one says so, ``cpu N`` picks the vCPU."""
    from xenicorn.debug.qmp import QmpServer
    proc, sock = start(tmp_path, "spin32", "-smp", "2", "--xenstore", "data/seeded=by-cli")

    async def go():
        client = await session(sock)

        async def hmp(line, **extra):
            return await client.execute("human-monitor-command", {"command-line": line, **extra})
        out = {line: await hmp(line) for line in ("info", "info bogus", "info status", "info pic", "info lapic",
                                                   "info registers", "info evtchn", "info irq", "cpu 7")}
        out["cpu 1"] = await hmp("cpu 1")
        out["lapic 1"] = await hmp("info lapic")
        out["cpus"] = await hmp("info cpus")
        out["regs via cpu-index"] = await hmp("info registers", **{"cpu-index": 0})
        # one rule for keys: relative ones are the guest's, as --xenstore's
        out["name"] = await hmp("xenstore-read name")
        out["write"] = await hmp("xenstore-write data/from-monitor yes")
        out["seeded"] = await hmp("xenstore-read /local/domain/1/data/seeded")
        out["written"] = await hmp("xenstore-read /local/domain/1/data/from-monitor")
        await client.execute("quit")
        await closed(client)
        return out
    out = asyncio.run(go())
    assert proc.wait(timeout=30) == 0
    listed = [line.split()[1] for line in out["info"].splitlines()]
    assert listed == list(QmpServer.INFO) and "pic" in listed and "evtchn" in listed
    assert all(" -- " in line for line in out["info"].splitlines())
    assert out["info bogus"] == "unknown command: 'info bogus' (info alone lists them)\r\n"
    assert out["info status"] == "VM status: running\r\n"
    assert out["info pic"].startswith("pic0: irr=") and "\r\nioapic0: ver=0x20 " in out["info pic"]
    assert out["info lapic"].startswith("dumping local APIC state for CPU 0 \r\n")
    assert out["info registers"].startswith("EAX=") and "\r\nCS =" in out["info registers"]    # 32-bit guest
    assert out["info evtchn"].startswith("event channel ABI: 2-level\r\n")
    assert out["info irq"].startswith("IRQ statistics for isa-i8259:\r\n")
    assert out["cpu 7"] == "invalid CPU index\r\n" and out["cpu 1"] == ""
    assert out["lapic 1"].startswith("dumping local APIC state for CPU 1 ")
    assert "* CPU #1:" in out["cpus"] and "  CPU #0:" in out["cpus"]
    assert out["regs via cpu-index"].startswith("EAX=")
    assert (out["name"], out["write"], out["written"]) == ("xenicorn\r\n", "", "yes\r\n")
    assert out["seeded"] == "by-cli\r\n"
