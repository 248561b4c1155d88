"""The xen-platform PCI device: how an HVM guest finds its Xen drivers' anchor.

An HVM guest's PV drivers (Linux ``xen-platform-pci``, the Windows PV
drivers) look for this device: PCI vendor 0x5853 ("XS", XenSource), device
0x0001, class 0xFF80 (other), revision 1, subsystem 5853:0001. It offers:

* **BAR0**, 256 bytes of I/O: byte 0 the platform flags (bit 0 locks the
  option ROM area read-only), byte 8 a log port (a driver writes a line of
  text one byte at a time).
* **BAR1**, 16 MiB of prefetchable memory: guest-physical space that is not
  RAM, where drivers map shared frames such as the grant table.
* **INTA**, the pin that ``HVM_PARAM_CALLBACK_IRQ`` type 1 (PCI INTx) uses
  for the event-channel upcall: level-triggered, raised when an event is
  delivered to vCPU 0 and lowered when vCPU 0's ``evtchn_upcall_pending``
  is clear again.
* **Fixed ports 0x10-0x1F** (not a BAR), the "unplug" protocol: a 16-bit
  read of 0x10 returns the magic 0x49D2 (0xD249 if the drivers are
  blacklisted); byte 0x12 reads the protocol version (1); writing a mask to
  0x10 (16-bit) asks the emulator to unplug its emulated disks (bit 0), NICs
  (bit 1) or secondary IDE disks (bit 2) so the PV drivers take over; a
  16-bit write to 0x12 gives the driver's product number, a byte write to
  0x12 is another log port.

Facts from QEMU's hw/i386/xen/xen_platform.c and Xen's
docs/misc/hvm-emulated-unplug.pandoc.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from ..records import RecordError, field, flag, make_record, open_record, text, uint
from .pci import PciFunction, BAR_IO, BAR_MEM_PREFETCH, PCI_COMMAND_IO, PCI_COMMAND_MEMORY

XEN_PLATFORM_VENDOR, XEN_PLATFORM_DEVICE = 0x5853, 0x0001
FIXED_IOPORT = 0x10
MAGIC, MAGIC_BLACKLISTED = 0x49D2, 0xD249
UNPLUG_ALL_IDE_DISKS, UNPLUG_ALL_NICS, UNPLUG_AUX_IDE_DISKS = 1, 2, 4
MMIO_BAR_SIZE = 16 << 20


@dataclass
class XenPlatformState:
    """Device registers beyond PCI configuration space."""

    flags: int = 0                    # platform flags byte (bit 0: ROM lock)
    unplugged: int = 0                # mask of UNPLUG_* requests received
    product: int = 0                  # PV driver product number (16-bit write to 0x12)
    driver_version: int = 0           # 32-bit write to 0x10
    drivers_blacklisted: bool = False
    log_line: str = ""                # log bytes not yet ended by a newline


class _IoBar:
    def __init__(self, owner: "XenPlatformDevice"):
        self.owner = owner

    def pio_read(self, offset: int, size: int) -> int:
        return self.owner.platform_state.flags if offset == 0 else (1 << (8 * size)) - 1

    def pio_write(self, offset: int, size: int, value: int) -> None:
        if offset == 0:
            self.owner.platform_state.flags = value & 1
        elif offset == 8:
            self.owner.log_byte(value & 0xFF)


class _MmioBar:
    """Reads as zero, ignores writes: space for frames the hypervisor maps in."""

    def mmio_read(self, offset: int, size: int) -> int:
        return 0

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        pass


class _FixedPorts:
    def __init__(self, owner: "XenPlatformDevice"):
        self.owner = owner

    def pio_read(self, offset: int, size: int) -> int:
        st = self.owner.platform_state
        if offset == 0 and size == 2:
            return MAGIC_BLACKLISTED if st.drivers_blacklisted else MAGIC
        if offset == 0 and size == 1:
            return st.flags
        if offset == 2 and size == 1:
            return 1                               # unplug protocol version
        return (1 << (8 * size)) - 1

    def pio_write(self, offset: int, size: int, value: int) -> None:
        st = self.owner.platform_state
        if offset == 0 and size == 2:
            st.unplugged |= value & 7
            self.owner.log(f"unplug request {value:#x} (no emulated disks or NICs to remove)")
        elif offset == 0 and size == 1:
            st.flags = value & 1
        elif offset == 0 and size == 4:
            st.driver_version = value
        elif offset == 2 and size == 2:
            st.product = value
        elif offset == 2 and size == 1:
            self.owner.log_byte(value & 0xFF)


class XenPlatformDevice(PciFunction):
    """xen-platform at its PCI slot, plus the fixed I/O ports."""

    def __init__(self, log=None):
        super().__init__(XEN_PLATFORM_VENDOR, XEN_PLATFORM_DEVICE, 0xFF8000, revision=1,
                         subsystem=(XEN_PLATFORM_VENDOR, XEN_PLATFORM_DEVICE), pin=1)
        self.platform_state = XenPlatformState()
        self.add_bar(0, BAR_IO, 0x100, _IoBar(self))
        self.add_bar(1, BAR_MEM_PREFETCH, MMIO_BAR_SIZE, _MmioBar())
        self.state.config[0x04] = PCI_COMMAND_IO | PCI_COMMAND_MEMORY
        self.fixed_ports = _FixedPorts(self)
        self._log = log or (lambda text: None)

    def log(self, text: str) -> None:
        self._log(f"xen-platform: {text}")

    def log_byte(self, byte: int) -> None:
        st = self.platform_state
        if byte == 0x0A or len(st.log_line) >= 4095:
            self.log(st.log_line)
            st.log_line = ""
        else:
            st.log_line += chr(byte)

    # -- snapshots (a record, see xenicorn.records) -----------------------------------
    RECORD = ("xen-platform", 1)

    def save_record(self) -> dict:
        """Configuration space (as any PCI function) and the platform registers."""
        st = self.platform_state
        return make_record(*self.RECORD, {**self.save(), "platform": {
            "flags": st.flags, "unplugged": st.unplugged, "product": st.product,
            "driver_version": st.driver_version, "drivers_blacklisted": st.drivers_blacklisted,
            "log_line": st.log_line}})

    def check_record(self, record: dict):
        """The PCI checks, and registers as the port writes leave them (flags bit 0, unplug mask 3 bits)."""
        st = open_record(record, *self.RECORD)
        ps = field(st, "platform")
        log_line = text(ps, "log_line", 4095)
        if any(ord(ch) > 0xFF for ch in log_line):
            raise RecordError("xen-platform log line holds characters no byte write makes")
        platform = XenPlatformState(uint(ps, "flags", 1), uint(ps, "unplugged", 3), uint(ps, "product", 16),
                                    uint(ps, "driver_version", 32), flag(ps, "drivers_blacklisted"), log_line)
        return self.check_config(st), platform

    def apply_record(self, prepared) -> None:
        config, platform = prepared
        super().apply_record(config)
        self.platform_state = replace(platform)
