"""The Xen layer of a machine: what the hypervisor does for an HVM guest.

A Xen-aware kernel discovers and reaches Xen in three steps, and this module
provides each of them (QEMU's equivalent is ``target/i386/kvm/xen-emu.c``):

1. **CPUID leaves 0x40000000-0x40000005** (xen/include/public/arch-x86/
   cpuid.h): the "XenVMMXenVMM" signature and the highest leaf; the version;
   the number of hypercall pages (1) and the MSR that installs them
   (0x40000000); TSC information; HVM features with the vCPU and domain IDs.
2. **The hypercall page**: the guest writes a page's guest-physical address
   to MSR 0x40000000 and Xen fills it with 32-byte stubs, one per hypercall
   number N: ``mov eax, N ; vmcall ; ret`` (``vmmcall`` on AMD), the rest of
   the page ``int3``. Stub 23 (``iret``, PV only) is ``ud2``. Unicorn cannot
   hook WRMSR, so the guest's CPUID 0x40000002 query opens the vCPU's MSR
   intercept window (:mod:`xenicorn.engine.msr`) and the MSR write closes
   it: nothing is paid before or after.
3. **Hypercalls**: ``VMCALL``/``VMMCALL`` anywhere (Linux 6.x also calls them
   inline) reaches :meth:`XenPlatform.handle_hypercall`, which dispatches by
   number (:mod:`xenicorn.xen.hypercall`) and resumes after the instruction.
"""
from __future__ import annotations

import struct
import time
from dataclasses import dataclass, field

from .. import exits as E
from . import hypercall, version, console, denials, sched, memory, hvm, vcpu_op, pvclock, timers
from .callback import Callback
from .host import XenHost
from .evtchn import EventChannels, VIRQ_TIMER, Port, UNBOUND, BACKEND_DOMID
from .physdev import Physdev
from .gnttab import GrantTable
from .pvconsole import PvConsole
from .xenstore.server import XenstoreServer
from .xenstore.store import Store, Perm
from .shared_info import SharedInfo, VcpuInfo, layout

XEN_CPUID_BASE = 0x40000000
HYPERCALL_MSR = 0x40000000
XEN_HVM_CPUID_VCPU_ID_PRESENT = 1 << 3
XEN_HVM_CPUID_DOMID_PRESENT = 1 << 4
XEN_HVM_CPUID_UPCALL_VECTOR = 1 << 6
VMCALL, VMMCALL = b"\x0f\x01\xc1", b"\x0f\x01\xd9"
MSR_INTEREST = "xen-hypercall-page"
MAXMEM_SLACK_PAGES = 256               # LIBXL_MAXMEM_CONSTANT (1024 KiB, libxl_internal.h)


@dataclass
class XenConfig:
    """What the hypervisor says about itself."""

    version: tuple[int, int] = (4, 17)
    extraversion: str = ".0-xenicorn"
    domid: int = 1                         # the emulator itself plays domain 0
    handle: bytes = bytes(range(16))       # xen_domain_handle_t (a UUID)
    gnttab_max_frames: int = 64            # like QEMU's xen-gnttab-max-frames
    evtchn_fifo: bool = True               # offer the FIFO event-channel ABI (QEMU does not)


@dataclass
class VcpuState:
    """What Xen keeps per vCPU."""

    vcpu_info_gpa: int | None = None       # set by VCPUOP_register_vcpu_info
    runstate_area: int | None = None       # guest linear address
    time_area: int | None = None           # guest linear address (second vcpu_time_info)
    periodic_ns: int = 0                   # VCPUOP_set_periodic_timer period, 0 = off
    singleshot_ns: int | None = None       # VCPUOP_set_singleshot_timer deadline
    poll_done: bool = False                # SCHEDOP_poll timed out
    timer_events: int = 0                  # VIRQ_TIMER events raised (delivered once bound)
    initialised: bool = False              # VCPUOP_initialise gave it a state (xen/vcpu_up.py)
    poll_ports: tuple[int, ...] = ()       # the ports a SCHEDOP_poll waits on (any one pending wakes it)
    timers: dict = field(default_factory=dict, repr=False)   # name -> clock Timer (not state)


@dataclass
class XenState:
    """The hypervisor's view of the domain (what a snapshot must keep)."""

    hypercall_page: int | None = None      # guest-physical address, once installed
    width: int | None = None               # 32 or 64: latched from the guest's hypercalls
    features: set[int] = field(default_factory=lambda: {version.XENFEAT_auto_translated_physmap,
                                                        version.XENFEAT_hvm_safe_pvclock,
                                                        version.XENFEAT_hvm_callback_vector,
                                                        version.XENFEAT_hvm_pirqs})
    shared_info_gpa: int | None = None     # XENMAPSPACE_shared_info
    grant_frames: dict[int, int] = field(default_factory=dict)    # frame index -> gpfn
    params: dict[int, int] = field(default_factory=dict)          # HVM_PARAM_* values
    upcall_vectors: dict[int, int] = field(default_factory=dict)  # vCPU -> vector
    vcpus: dict[int, VcpuState] = field(default_factory=dict)
    ballooned: set[int] = field(default_factory=set)               # frames given back
    pages: int = 0                         # current reservation
    watchdogs: dict[int, int] = field(default_factory=dict)        # id -> deadline (ns)


class XenPlatform:
    """Xen for one HVM domain, on a :class:`~xenicorn.xen.host.XenHost` (the machine).

    Building it plugs Xen into the host: its CPUID leaves, the hypercall-page
    MSR, VMCALL, the PIRQ filter on GSIs, the callback vector as an
    interrupt source, what wakes a blocked vCPU, and the PV console's input.
    """

    def __init__(self, host: XenHost, config: XenConfig | None = None, callback_deassert: str = "poll"):
        self.host = host
        self.config = config or XenConfig()
        self.state = XenState()
        self.shutdown_code: int | None = None
        self.console_input = bytearray()
        self.unimplemented_seen: set[str] = set()
        self.hypercall_counts: dict[str, int] = {}
        self.state.pages = self.ram_pages()
        self.boot_ns = 0
        self.tsc = host.tsc
        # (TSC, Xen ns, mul, shift): see now_ns. Deterministic: TSC 0 is time 0,
        # the same line in every run and after every restore.
        self.time_base: tuple[int, int, int, int] | None = (
            (0, 0, *pvclock.scale_for(self.tsc.hz())) if host.clock.deterministic else None)
        self.watchdog_timers: dict = {}
        self.evtchn = EventChannels(self, fifo=self.config.evtchn_fifo)
        self.physdev = Physdev(self)
        self.gnttab = GrantTable(self)
        self.callback = Callback(self, callback_deassert)
        self.table = {
            hypercall.NUMBERS["event_channel_op"]: self.evtchn.hypercall,
            hypercall.NUMBERS["physdev_op"]: self.physdev.hypercall,
            hypercall.NUMBERS["grant_table_op"]: self.gnttab.hypercall,
            hypercall.NUMBERS["set_timer_op"]: timers.set_timer_op,
            hypercall.NUMBERS["xen_version"]: version.xen_version,
            hypercall.NUMBERS["console_io"]: console.console_io,
            hypercall.NUMBERS["sched_op"]: sched.sched_op,
            hypercall.NUMBERS["memory_op"]: memory.memory_op,
            hypercall.NUMBERS["hvm_op"]: hvm.hvm_op,
            hypercall.NUMBERS["vcpu_op"]: vcpu_op.vcpu_op,
            **denials.TABLE,                     # what Xen refuses a domU, as Xen refuses it
        }
        self.console_log = console.GuestConsoleLog(self.config.domid, host.xen_log.write)
        self._build_dom0_services()
        host.add_cpuid_provider(self.cpuid)
        host.add_msr_handler(HYPERCALL_MSR, self.hypercall_msr)
        host.set_hypercall_handler(self.handle_hypercall)
        host.add_gsi_filter(self.physdev.gsi_changed)
        host.add_interrupt_source(self.callback)
        host.add_wake_source(self.wakes)
        host.set_console_input(self.pvconsole.feed)

    # -- what the toolstack sets up before the guest runs ------------------------------
    SPECIAL_AREA = 0xFEFF8000               # hvmloader's special pages, as QEMU places them
    XENSTORE_PFN = (SPECIAL_AREA >> 12) + 4
    CONSOLE_PFN = (SPECIAL_AREA >> 12) + 7
    XENSTORE_FRAME, CONSOLE_FRAME = 254, 255   # hypervisor frames backing them

    def _build_dom0_services(self) -> None:
        """The xenstore and PV console pages and ports a toolstack gives every HVM guest.

        Each service gets a hypervisor frame in the special area above the
        PCI BARs (reserved in the E820 map), and a guest port that is
        already connected to xenicorn, which plays dom0: the guest finds
        both in HVM_PARAM_STORE_PFN/EVTCHN and CONSOLE_PFN/EVTCHN.
        """
        host = self.host
        host.memory.reserve(self.SPECIAL_AREA, 0x8000)
        trace = (lambda text: host.tracer.emit("xenstore", text)) if host.tracer.on("xenstore") else None
        self.store = Store()
        self.host_watches: dict = {}
        xs_gpa, con_gpa = self.XENSTORE_PFN << 12, self.CONSOLE_PFN << 12
        host.memory.map_frame(self.XENSTORE_FRAME, xs_gpa)
        host.memory.map_frame(self.CONSOLE_FRAME, con_gpa)
        xs_port, self.xenstore_backend = self._dom0_port(self._xenstore_kick)
        con_port, self.console_backend = self._dom0_port(lambda: self.pvconsole.kick())
        self.xenstore = XenstoreServer(self.store, host.memory, xs_gpa, self.config.domid,
                                       self.xenstore_backend.notify, trace)
        self.xenstore.reset_page()
        self.pvconsole = PvConsole(host.memory, con_gpa, host.console.write, self.console_backend.notify)
        p = self.state.params
        p[hvm.HVM_PARAM_STORE_PFN], p[hvm.HVM_PARAM_STORE_EVTCHN] = self.XENSTORE_PFN, xs_port
        p[hvm.HVM_PARAM_CONSOLE_PFN], p[hvm.HVM_PARAM_CONSOLE_EVTCHN] = self.CONSOLE_PFN, con_port
        # the toolstack's view (Xen's hpet_init sets it; a guest reading it gets -EPERM)
        p[hvm.HVM_PARAM_HPET_ENABLED] = int(getattr(host, "hpet", None) is not None)
        self._populate_store(xs_port, con_port)

    def _xenstore_kick(self) -> None:
        self.xenstore.kick()
        self.dom0_events()

    def _dom0_port(self, on_event):
        port = self.evtchn._alloc(Port(UNBOUND, remote_domid=BACKEND_DOMID))
        be = self.evtchn.backend_open(on_event)
        be.bind(port)
        return port, be

    def _populate_store(self, xs_port: int, con_port: int) -> None:
        """The tree a guest expects to find (what xl writes for an HVM domain)."""
        st, me = self.store, self.config.domid
        home = f"/local/domain/{me}"
        kib = self.ram_pages() * 4
        for path, value in [("/local/domain/0/name", "Domain-0"), (f"{home}/name", "xenicorn"),
                            (f"{home}/domid", str(me)), (f"{home}/memory/target", str(kib)),
                            (f"{home}/memory/static-max", str(kib)),
                            (f"{home}/store/ring-ref", str(self.XENSTORE_PFN)), (f"{home}/store/port", str(xs_port)),
                            (f"{home}/console/ring-ref", str(self.CONSOLE_PFN)),
                            (f"{home}/console/port", str(con_port)), (f"{home}/console/type", "xenconsoled")]:
            st.write(0, path, value.encode())
        readable = [Perm(0, "n"), Perm(me, "r")]
        for path in self._tree(home):                          # the guest reads, dom0 writes
            st.set_perms(0, path, readable)
        for sub in ("data", "control", "device", "error", "drivers", "attr", "feature"):
            st.mkdir(0, f"{home}/{sub}")
            st.set_perms(0, f"{home}/{sub}", [Perm(me, "n")])       # the guest's own
        st.write(0, f"{home}/control/platform-feature-multiprocessor-suspend", b"1")
        # The primary console as the toolstack describes it (state 4: XenbusStateConnected).
        # Its frontend is <home>/console, not device/console/0: a guest's xenbus
        # only enumerates device/*, and Linux, finding a "connected" device
        # there at boot, resets it and waits 3 x 5 s for a backend that
        # nothing drives (measured with Debian's 6.1).
        back = f"/local/domain/0/backend/console/{me}/0"
        front = f"{home}/console"
        for path, value in [(f"{back}/frontend", front), (f"{back}/frontend-id", str(me)), (f"{back}/state", "4"),
                            (f"{front}/backend", back), (f"{front}/backend-id", "0"), (f"{front}/state", "4"),
                            (f"{front}/limit", "1048576")]:
            st.write(0, path, value.encode())
        for path in self._tree(back):
            st.set_perms(0, path, readable)
        st.take_events(me)

    def _tree(self, path: str) -> list[str]:
        out = [path]
        for child in self.store.directory(0, path):
            out += self._tree(f"{path}/{child}")
        return out

    def guest_key(self, key: str) -> str:
        """A xenstore key as the user typed it (``--xenstore``, the monitor's ``xenstore-read``): a
        relative key is the guest's, under ``/local/domain/<domid>``; an absolute one stays.

        One rule for every place a user names a key. It is the rule QEMU's own
        Xen emulation follows for the keys it seeds for its guest
        (hw/i386/kvm/xen_xenstore.c relpath_printf: ``/local/domain/<xen_domid>/``
        + the relative key), and the keys a user means are the guest's
        (``name``, ``control/shutdown``, ``device/...``): xenstored's rule for
        the caller's own domain would send them to dom0's home, which the
        guest never reads. The Python API below is dom0's and follows
        xenstored's rule (a relative path is under ``/local/domain/0``).
        """
        return key if key.startswith("/") else f"/local/domain/{self.config.domid}/{key}"

    def xenstore_read(self, path: str) -> bytes:
        """Read as dom0 (the host side)."""
        return self.store.read(0, path)

    def xenstore_write(self, path: str, value: bytes) -> None:
        """Write as dom0 (the host side), firing the guest's watches."""
        self.store.write(0, path, value)
        self.xenstore.kick()
        self.dom0_events()

    def xenstore_watch(self, path: str, callback) -> None:
        """Call ``callback(path)`` whenever ``path`` or a node below it changes (a dom0 watch)."""
        token = f"host{len(self.host_watches)}"
        self.host_watches[token] = callback
        self.store.watch(0, path, token)
        self.store.take_events(0)                         # not the registration event

    def dom0_events(self) -> None:
        for path, token in self.store.take_events(0):
            cb = self.host_watches.get(token)
            if cb is not None:
                cb(path)

    # -- 1. CPUID ----------------------------------------------------------
    def cpuid(self, leaf: int, sub: int, vcpu_index: int):
        """The Xen leaves; None for leaves that are not Xen's."""
        if not XEN_CPUID_BASE <= leaf <= XEN_CPUID_BASE + 0xFF:
            return None
        n = leaf - XEN_CPUID_BASE
        if n == 0:
            b, c, d = struct.unpack("<III", b"XenVMMXenVMM")
            return (XEN_CPUID_BASE + 5, b, c, d)
        if n == 1:
            major, minor = self.config.version
            return ((major << 16) | minor, 0, 0, 0)
        if n == 2:
            # The guest is about to install the hypercall page: watch the MSR.
            self.host.vcpus[vcpu_index].msr.open(MSR_INTEREST)
            return (1, HYPERCALL_MSR, 0, 0)
        if n == 3:
            # Time leaf: sub-leaf 0 TSC mode (0 = native TSC) and the guest
            # TSC frequency in kHz; 1: offset, mul, shift; 2: host TSC kHz.
            khz = int(self.tsc.hz() // 1000)
            if sub == 0:
                return (0, 0, khz, 0)
            if sub == 1:
                mul, shift = pvclock.scale_for(self.tsc.hz())
                return (0, 0, mul, shift & 0xFFFFFFFF)
            if sub == 2:
                return (khz, 0, 0, 0)
            return (0, 0, 0, 0)
        if n == 4:
            flags = XEN_HVM_CPUID_VCPU_ID_PRESENT | XEN_HVM_CPUID_DOMID_PRESENT | XEN_HVM_CPUID_UPCALL_VECTOR
            return (flags, vcpu_index, self.config.domid, 0)
        return (0, 0, 0, 0)

    # -- 2. the hypercall page ------------------------------------------------
    def hypercall_msr(self, vcpu, ex: E.Msr):
        """WRMSR 0x40000000 = GPA of the page | page index (must be 0).

        Reading the MSR, a page index other than 0 or a page that is not
        RAM raise #GP(0), as Xen's ``guest_wrmsr_xen`` does.
        """
        gpa = ex.value & ~0xFFF
        if not ex.write or ex.value & 0xFFF or not self.host.memory.is_ram(gpa, 4096):
            return self.host.deliver_exception(vcpu, 13, 0)
        self.fill_hypercall_page(gpa)
        vcpu.msr.close(MSR_INTEREST)
        if self.host.tracer.on("hypercalls"):
            self.host.tracer.emit("hypercalls", f"hypercall page installed at {gpa:#x}")
        return E.Action.CONTINUE

    def fill_hypercall_page(self, gpa: int) -> None:
        insn = VMMCALL if self.host.vendor == "amd" else VMCALL
        page = bytearray(b"\xcc" * 4096)
        for n in range(4096 // 32):
            page[n * 32:n * 32 + 9] = b"\xb8" + struct.pack("<I", n) + insn + b"\xc3"
        iret = hypercall.NUMBERS["iret"] * 32
        page[iret:iret + 9] = b"\x0f\x0b" + b"\xcc" * 7
        mem = self.host.memory
        mem.write(gpa, bytes(page))
        mem.code_written(gpa, 4096)
        self.state.hypercall_page = gpa

    # -- 3. hypercalls -----------------------------------------------------
    def handle_hypercall(self, vcpu, ex: E.Hypercall) -> E.Action:
        call = hypercall.dispatch(self, vcpu, self.table, ex.snapshot)
        self.state.width = call.bits
        ex.number, ex.args, ex.result = call.number, call.args, call.result
        name = hypercall.HYPERCALL_NAMES.get(call.number, str(call.number))
        self.hypercall_counts[name] = self.hypercall_counts.get(name, 0) + 1
        if self.host.tracer.on("hypercalls"):
            from .errno import name as errname
            from .hcnames import describe
            args = describe(name, call.args, call.guest.read_u32)
            extra = f"  [{'; '.join(call.notes)}]" if call.notes else ""
            res = errname(call.result) if call.result < 0 else f"{call.result:#x}"
            self.host.tracer.emit("hypercalls", f"{name}({args}) = {res}{extra}")
        if call.stop or self.host.status is not None:
            return E.Action.STOP
        vcpu.pc = ex.pc + 3                      # past VMCALL/VMMCALL
        return E.Action.CONTINUE

    # -- memory, shared_info, vcpu_info, time ----------------------------------
    def ram_pages(self) -> int:
        """The pages the domain was built with: its memory (xl's ``memory`` = ``maxmem``)."""
        return self.host.memory.size // 4096

    def max_pages(self) -> int:
        """Xen's d->max_pages: the RAM plus the slack libxl adds (libxl__build_pre sets maxmem to
        target + libxl__arch_extra_memory, LIBXL_MAXMEM_CONSTANT = 1 MiB on x86), room to populate."""
        return self.ram_pages() + MAXMEM_SLACK_PAGES

    def max_ram_page(self) -> int:
        base, length, _ = self.host.memory.ram_regions[-1]
        return (base + length) // 4096 - 1

    def now_ns(self) -> int:
        """Xen system time: what the guest's PV clock reads now.

        The guest never asks Xen for the time: it converts its own TSC with
        the ``vcpu_time_info`` record. So Xen's idea of "now", against which
        it compares the guest's absolute deadlines, must be the *same*
        function of the TSC, or the two clocks drift apart. A guest behind
        Xen sets a deadline that Xen finds already past, takes the timer
        interrupt, sees nothing expired on its clock, sets the same deadline
        again: an interrupt storm that lasts as long as the lag (Linux did
        this, with our TSC rate 0.14% off after a 20 ms calibration).

        The conversion is fixed when first needed (``time_base``: a TSC
        value, the machine time then, and the scale) and every record Xen
        publishes is a point on that same line. In deterministic mode the
        TSC *is* the machine clock at 1 GHz, so this equals the machine
        clock exactly.
        """
        self._fix_time_base()
        return self._time_at(self.tsc.read())

    def _fix_time_base(self) -> tuple[int, int, int, int]:
        if self.time_base is None:
            self.time_base = (self.tsc.read(), self.host.clock.now_ns(), *pvclock.scale_for(self.tsc.hz()))
        return self.time_base

    def _time_at(self, tsc: int) -> int:
        base_tsc, base_ns, mul, shift = self.time_base
        return base_ns + pvclock.ticks_to_ns(tsc - base_tsc, mul, shift)

    def machine_deadline(self, xen_ns: int) -> int:
        """The machine-clock time at which Xen's clock reaches ``xen_ns``.

        Exact in deterministic mode; in host mode the two rates differ by the
        TSC calibration error, so a timer armed this way may fire a few µs
        early for a far deadline: :meth:`set_singleshot` looks again.
        """
        return self.host.clock.now_ns() + (xen_ns - self.now_ns())

    def restart_time(self) -> None:
        """A snapshot was restored: continue Xen time from the machine clock.

        The host TSC of this process has nothing to do with the saved one,
        so the conversion starts again from the restored machine time and
        every vCPU gets a fresh record (the guest's clock continues). In
        deterministic mode the TSC is machine time, restored exactly: nothing
        to do.
        """
        if self.host.clock.deterministic:
            return
        self.time_base = None
        if self.state.shared_info_gpa is not None:
            for i in range(len(self.host.vcpus)):
                self.update_time(i)

    def vcpu_state(self, index: int) -> VcpuState:
        return self.state.vcpus.setdefault(index, VcpuState())

    def shared_info(self) -> SharedInfo | None:
        gpa = self.state.shared_info_gpa
        return None if gpa is None else SharedInfo(self.host.memory, gpa, self.state.width or 64)

    def vcpu_info(self, index: int) -> VcpuInfo | None:
        """Where vCPU ``index``'s vcpu_info lives now (registered page or shared_info)."""
        vs = self.vcpu_state(index)
        if vs.vcpu_info_gpa is not None:
            return VcpuInfo(self.host.memory, vs.vcpu_info_gpa, layout(self.state.width or 64))
        si = self.shared_info()
        return si.vcpu_info(index) if si is not None and index < 32 else None

    def map_shared_info(self, gpa: int, bits: int) -> None:
        """XENMAPSPACE_shared_info: that RAM page becomes shared_info."""
        self.state.width = bits
        self.state.shared_info_gpa = gpa
        self.host.memory.fill(gpa, 4096)
        si = self.shared_info()
        # deterministic runs start from a fixed date (2026-01-01), so they repeat
        wall = 1767225600 * 10**9 + self.now_ns() if self.host.clock.deterministic else time.time_ns()
        si.write_wallclock(wall // 1_000_000_000, wall % 1_000_000_000)
        for i in range(len(self.host.vcpus)):
            self.update_time(i)

    def register_vcpu_info(self, index: int, gpa: int, bits: int) -> None:
        """VCPUOP_register_vcpu_info: copy the current contents, then move."""
        self.state.width = self.state.width or bits
        old = self.vcpu_info(index)
        new = VcpuInfo(self.host.memory, gpa, layout(self.state.width))
        if old is not None:
            new.copy_from(old)
        else:
            self.host.memory.fill(gpa, 64)
        self.vcpu_state(index).vcpu_info_gpa = gpa
        self.update_time(index)

    def update_time(self, index: int) -> None:
        """Publish the PV clock in vcpu_info.time (and the registered time area)."""
        _, _, mul, shift = self._fix_time_base()
        tsc = self.tsc.read()
        now = self._time_at(tsc)
        info = self.vcpu_info(index)
        if info is not None:
            pvclock.publish(self.host.memory, info.time_gpa, tsc, now, mul, shift)
        area = self.vcpu_state(index).time_area
        if area is not None:
            from .guest import GuestAccess, HypercallError
            record = pvclock.TimeInfo(2, tsc, now, mul, shift).pack()
            try:
                GuestAccess(self.host.vcpus[index]).write(area, record)
            except HypercallError:
                pass                        # Xen ignores an unwritable area too

    # -- timers (VIRQ_TIMER is raised once event channels exist) ---------------
    def _arm(self, index: int, name: str, deadline: int, fire) -> None:
        """Arm vCPU timer ``name`` at machine-clock time ``deadline``."""
        vs = self.vcpu_state(index)
        self.host.clock.cancel(vs.timers.pop(name, None))
        vs.timers[name] = self.host.clock.add_timer(deadline, fire, f"vcpu{index}-{name}")

    def _disarm(self, index: int, name: str) -> None:
        self.host.clock.cancel(self.vcpu_state(index).timers.pop(name, None))

    def set_singleshot(self, index: int, deadline: int | None) -> None:
        """Arm (or with None stop) vCPU ``index``'s single-shot timer at Xen time ``deadline``."""
        vs = self.vcpu_state(index)
        vs.singleshot_ns = deadline
        if deadline is None:
            self._disarm(index, "singleshot")
            return
        self._arm(index, "singleshot", self.machine_deadline(deadline), self.singleshot_expiry(index))

    def singleshot_expiry(self, index: int):
        """The machine-clock callback of the single-shot timer (also re-armed by a snapshot).

        It fires VIRQ_TIMER only once *Xen's* clock has reached the
        deadline: the machine clock may be a little ahead of it.
        """
        vs = self.vcpu_state(index)

        def fire():
            vs.timers.pop("singleshot", None)
            deadline = vs.singleshot_ns
            if deadline is None:
                return
            early = deadline - self.now_ns()
            if early > 0:
                self._arm(index, "singleshot", self.host.clock.now_ns() + early, fire)
                return
            vs.singleshot_ns = None
            self.timer_fired(index)
        return fire

    def set_periodic(self, index: int, period: int) -> None:
        vs = self.vcpu_state(index)
        vs.periodic_ns = period
        if not period:
            self._disarm(index, "periodic")
            return

        def fire():
            self.timer_fired(index)
            self._arm(index, "periodic", self.host.clock.now_ns() + period, fire)
        self._arm(index, "periodic", self.now_ns() + period, fire)

    def timer_fired(self, index: int) -> None:
        """A vCPU timer expired: Xen sends VIRQ_TIMER to that vCPU."""
        self.vcpu_state(index).timer_events += 1
        if not self.evtchn.send_virq(VIRQ_TIMER, index) and self.host.tracer.on("evtchn"):
            self.host.tracer.emit("evtchn", f"VIRQ_TIMER for vCPU {index} (no port bound)")

    def callback_changed(self, old: int, new: int) -> None:
        """HVM_PARAM_CALLBACK_IRQ changed: re-plumb upcall delivery."""
        self.callback.set_via(new)

    def unimplemented(self, what: str) -> None:
        """-ENOSYS paths: say so once per kind, as QEMU's LOG_UNIMP does."""
        if what not in self.unimplemented_seen:
            self.unimplemented_seen.add(what)
            self.host.tracer.emit("hypercalls", f"unimplemented: {what} -> -ENOSYS")

    def feature_submap(self) -> int:
        return sum(1 << f for f in self.state.features)

    def block(self, vcpu) -> None:
        """SCHEDOP_block: sleep until an event or an interrupt is pending."""
        self.host.idle(vcpu, "SCHEDOP_block")

    def port_pending(self, port: int) -> bool:
        return 0 < port < self.evtchn.nr_ports and self.evtchn.is_pending(port)

    def wakes(self, vcpu) -> bool:
        """Does a blocked or polling vCPU have a reason to run again?"""
        vs = self.vcpu_state(vcpu.index)
        if vcpu.sleep_kind == "SCHEDOP_poll":
            # Xen's evtchn_check_pollers: a send to a polled port wakes the
            # poller even when the port is masked (Linux's PV spinlock kicker
            # port is, by disable_irq, and polls it with no timeout)
            if vs.poll_done or any(self.port_pending(p) for p in vs.poll_ports):
                return True
        info = self.vcpu_info(vcpu.index)
        return info is not None and bool(info.upcall_pending)
