"""The FIFO event-channel ABI: per-vCPU priority queues in guest memory.

The 2-level ABI (:mod:`.event_2l`) gives each port two bits in shared_info
and leaves the guest to scan bitmaps. The FIFO ABI (Xen 4.4+,
xen/common/event_fifo.c, xen/include/public/event_channel.h; Linux's side
is drivers/xen/events/events_fifo.c) gives each port a 32-bit *event word*
and puts pending events on queues, so the guest takes them in order and by
priority, and a domain may have up to 2^17 ports.

The guest provides the memory, Xen writes it:

* the **event array**: pages of 1024 event words, indexed by port, added
  one by one with ``EVTCHNOP_expand_array { u64 array_gfn }`` (at most
  128 pages: 2^17 ports). A word holds four flags and a link::

      bit 31 PENDING  an event is waiting
      bit 30 MASKED   do not queue it (the guest sets and clears this)
      bit 29 LINKED   the port is on a queue
      bit 28 BUSY     Xen is changing the link: the guest must not unmask
      bits 0-16 LINK  the next port on the same queue (0: none yet)

* one **control block** per vCPU, 72 bytes anywhere in a guest page
  (8-byte aligned, not crossing the page), given by
  ``EVTCHNOP_init_control { u64 control_gfn; u32 offset; u32 vcpu;
  OUT u8 link_bits }``::

      u32 ready      bit q: queue q of this vCPU has events
      u32 _rsvd
      u32 head[16]   the first port of each queue (the guest consumes them)

There are 16 queues per vCPU, one per priority; 0 is the most urgent and
new ports get 7 (``EVTCHNOP_set_priority { port; priority }`` changes it).
Raising an event on an unmasked port (evtchn_fifo_set_pending): set PENDING;
if the word was not LINKED, set LINKED and append the port to the queue of
its vCPU and priority -- write its number into the LINK of the queue's tail
if that tail is still LINKED (the guest has not consumed it), else into
``head[q]``, which starts a new run; in that second case set ``ready`` bit
q, and if *that* bit was clear, set the vCPU's ``evtchn_upcall_pending`` and
make the upcall -- through the same callback vias as the 2-level ABI
(:mod:`.callback`), and the guest clears the same flag.

The guest's handler reads ``ready``, picks the lowest set bit (the most
urgent queue), takes ``head[q]``, follows the LINKs, clears LINKED on each
word it consumes and handles the port if it is PENDING and not MASKED.

What Xen keeps *outside* guest memory, and this module with it: the frames
of the control blocks and array pages, each queue's tail, each port's
priority and the queue it last joined (so a port that moves vCPU or
priority leaves its old queue's tail clean), and a "pending" flag for an
event raised on a port whose array page does not exist yet, re-raised
when ``expand_array`` adds the page.

The domain starts with the 2-level ABI; the first successful init_control
switches it to FIFO, and ``EVTCHNOP_reset`` returns it to 2-level
(evtchn_reset -> evtchn_fifo_destroy). With ``--no-evtchn-fifo`` the three
FIFO ops answer -ENOSYS, as under QEMU.
"""
from __future__ import annotations

from ..records import RecordError, integer, listing
from . import errno
from .guest import HypercallError

PRIORITY_MAX, PRIORITY_DEFAULT, PRIORITY_MIN = 0, 7, 15
NR_QUEUES = PRIORITY_MIN + 1
PENDING, MASKED, LINKED, BUSY = 1 << 31, 1 << 30, 1 << 29, 1 << 28
LINK_BITS = 17
LINK_MASK = (1 << LINK_BITS) - 1
NR_CHANNELS = 1 << LINK_BITS
PAGE = 4096
WORDS_PER_PAGE = PAGE // 4
MAX_ARRAY_PAGES = NR_CHANNELS // WORDS_PER_PAGE      # 128
CONTROL_BLOCK_SIZE = 8 + 4 * NR_QUEUES               # ready, _rsvd, head[16]


class Fifo:
    """One domain's FIFO state (Xen's evtchn_fifo_domain and evtchn_fifo_vcpu, plus its per-port fields)."""

    name = "FIFO"
    nr_ports = NR_CHANNELS           # max_evtchns once FIFO is on (xen/common/event_channel.h)

    def __init__(self, channels):
        self.channels = channels
        self.xen = channels.xen
        self.memory = channels.xen.host.memory
        self.control: dict[int, int] = {}                 # vCPU -> control block address
        self.pages: list[int] = []                        # event array frames, in port order
        self.priority: dict[int, int] = {}                # port -> priority, when not the default
        self.lastq: dict[int, tuple[int, int]] = {}       # port -> (vCPU, priority) of the queue it last joined
        self.tails: dict[tuple[int, int], int] = {}       # (vCPU, priority) -> the queue's last port
        self.held: set[int] = set()                       # raised while its array page was missing

    # -- the event words --------------------------------------------------------------
    def word_address(self, port: int) -> int | None:
        """evtchn_fifo_word_from_port: None beyond the array (or if its page left the guest's RAM)."""
        if not 0 <= port < len(self.pages) * WORDS_PER_PAGE:
            return None
        addr = self.pages[port // WORDS_PER_PAGE] * PAGE + 4 * (port % WORDS_PER_PAGE)
        return addr if self.memory.is_ram(addr, 4) else None

    def word(self, port: int) -> int | None:
        addr = self.word_address(port)
        return None if addr is None else self.memory.read_u32(addr)

    def _test_and_set(self, addr: int, bit: int) -> bool:
        w = self.memory.read_u32(addr)
        self.memory.write_u32(addr, w | bit)
        return bool(w & bit)

    def _clear(self, addr: int, bit: int) -> None:
        self.memory.write_u32(addr, self.memory.read_u32(addr) & ~bit)

    def _control(self, vcpu: int) -> int | None:
        gpa = self.control.get(vcpu)
        return gpa if gpa is not None and self.memory.is_ram(gpa, CONTROL_BLOCK_SIZE) else None

    # -- the port operations (evtchn_port_ops) -------------------------------------------
    def set_pending(self, port: int, vcpu: int) -> bool:
        """evtchn_fifo_set_pending; True if the upcall flag went 0 -> 1."""
        addr = self.word_address(port)
        if addr is None:
            self.held.add(port)                 # delivered when expand_array adds the page
            self.channels.trace(f"port {port} pending (no event array page yet)")
            return False
        cb = self._control(vcpu)
        if cb is None:                          # Xen drops it: the guest must not unmask before init_control
            self.channels.trace(f"port {port} dropped: vCPU {vcpu} has no FIFO control block")
            return False
        self._test_and_set(addr, PENDING)
        prio = self.priority.get(port, PRIORITY_DEFAULT)
        if self.memory.read_u32(addr) & MASKED:
            self.channels.trace(f"port {port} pending (masked)")
            return False
        if self._test_and_set(addr, LINKED):
            self.channels.trace(f"port {port} pending (already linked)")
            return False
        q, old_q = (vcpu, prio), self.lastq.get(port, (0, 0))
        if self.tails.get(old_q) == port:       # it was its old queue's tail: that queue is now empty
            self.tails[old_q] = 0
        self.lastq[port] = q
        tail = self.tails.get(q, 0)
        linked = bool(tail) and self._set_link(tail, port)
        if not linked:
            self.memory.write_u32(cb + 8 + 4 * prio, port)        # head[prio]
        self.tails[q] = port
        if linked:
            self.channels.trace(f"port {port} pending: linked after port {tail} on vCPU {vcpu} queue {prio}")
            return False
        if self._test_and_set(cb, 1 << prio):                     # ready
            self.channels.trace(f"port {port} pending: head of vCPU {vcpu} queue {prio} (already ready)")
            return False
        return self.channels.mark_events_pending(vcpu, f"port {port} (queue {prio})")

    def _set_link(self, tail: int, port: int) -> bool:
        """evtchn_fifo_set_link: point the tail's LINK at ``port`` iff the tail is still LINKED."""
        addr = self.word_address(tail)
        if addr is None:
            return False
        w = self.memory.read_u32(addr)
        if not w & LINKED:
            return False                        # the guest consumed it: the queue restarts at head[]
        self.memory.write_u32(addr, (w & ~(BUSY | LINK_MASK)) | port)
        return True

    def unmask(self, port: int, vcpu: int) -> None:
        """evtchn_fifo_unmask: clear MASKED and queue the port if it is PENDING."""
        addr = self.word_address(port)
        if addr is None:
            return
        self._clear(addr, MASKED)
        if self.memory.read_u32(addr) & PENDING:
            self.set_pending(port, vcpu)

    def clear_pending(self, port: int) -> None:
        """evtchn_fifo_clear_pending (a port being freed): only PENDING; the guest unlinks it."""
        self.held.discard(port)
        addr = self.word_address(port)
        if addr is not None:
            self._clear(addr, PENDING)

    def is_pending(self, port: int) -> bool:
        return bool((self.word(port) or 0) & PENDING)

    def is_masked(self, port: int) -> bool:
        w = self.word(port)
        return w is None or bool(w & MASKED)            # no word: masked, as evtchn_fifo_is_masked

    def is_busy(self, port: int) -> bool:
        """A LINKED port is still on a queue: get_free_port skips it."""
        return bool((self.word(port) or 0) & LINKED)

    def init_port(self, port: int) -> None:
        """evtchn_fifo_init: a newly allocated port starts at the default priority."""
        self.priority.pop(port, None)
        self.held.discard(port)

    def set_priority(self, port: int, priority: int) -> None:
        """evtchn_fifo_set_priority: only future events go to the new queue."""
        if priority > PRIORITY_MIN:
            raise HypercallError(errno.EINVAL, f"priority {priority}")
        if priority == PRIORITY_DEFAULT:
            self.priority.pop(port, None)
        else:
            self.priority[port] = priority

    def describe(self, port: int) -> dict:
        w = self.word(port)
        return {"priority": self.priority.get(port, PRIORITY_DEFAULT),
                "linked": bool(w is not None and w & LINKED)}

    # -- looking at the queues (tests, monitors) -----------------------------------------
    def ready(self, vcpu: int) -> int:
        cb = self._control(vcpu)
        return 0 if cb is None else self.memory.read_u32(cb)

    def queue(self, vcpu: int, priority: int) -> list[int]:
        """The ports on one queue as the guest would walk it: head[q], then LINK while LINKED."""
        cb = self._control(vcpu)
        if cb is None or not self.ready(vcpu) >> priority & 1:
            return []
        out, port = [], self.memory.read_u32(cb + 8 + 4 * priority)
        while port and port not in out:
            w = self.word(port)
            if w is None or not w & LINKED:
                break
            out.append(port)
            port = w & LINK_MASK
        return out

    # -- the hypercalls ----------------------------------------------------------------------
    def map_control_block(self, vcpu: int, gfn: int, offset: int) -> None:
        if vcpu in self.control:
            raise HypercallError(errno.EINVAL, f"vCPU {vcpu} already has a control block")
        if not self.memory.is_ram(gfn * PAGE, PAGE):          # map_guest_page
            raise HypercallError(errno.EINVAL, f"frame {gfn:#x} is not RAM")
        self.control[vcpu] = gfn * PAGE + offset

    def add_page(self, gfn: int) -> None:
        """add_page_to_event_array, then re-raise what was held for its ports."""
        if len(self.pages) >= MAX_ARRAY_PAGES:
            raise HypercallError(errno.ENOSPC, f"the event array has its {MAX_ARRAY_PAGES} pages")
        if not self.memory.is_ram(gfn * PAGE, PAGE):
            raise HypercallError(errno.EINVAL, f"frame {gfn:#x} is not RAM")
        self.pages.append(gfn)
        first, end = (len(self.pages) - 1) * WORDS_PER_PAGE, len(self.pages) * WORDS_PER_PAGE
        for port in sorted(p for p in self.held if first <= p < end):
            self.held.discard(port)
            entry = self.channels.ports.get(port)
            if entry is not None:
                self.set_pending(port, entry.vcpu)


def init_control(channels, call, arg: int) -> int:
    """EVTCHNOP_init_control, in evtchn_fifo_init_control's order of checks."""
    control_gfn, offset, vcpu = call.guest.read_struct(arg, "<QII8x")
    if not channels.valid_vcpu(vcpu):
        raise HypercallError(errno.ENOENT, f"vCPU {vcpu}")
    if offset > PAGE - CONTROL_BLOCK_SIZE or offset & 7:      # within the page, 8-byte aligned
        raise HypercallError(errno.EINVAL, f"control block offset {offset:#x}")
    first = not isinstance(channels.abi, Fifo)
    fifo = Fifo(channels) if first else channels.abi
    fifo.map_control_block(vcpu, control_gfn, offset)        # a failure leaves the domain as it was
    if first:
        # setup_ports: each open port keeps an event pending in the 2-level bitmap, at the default priority
        fifo.held = {port for port in channels.ports if channels.abi.is_pending(port)}
        channels.abi = fifo
        channels.trace("switched to the FIFO ABI")
    call.guest.write(arg + 16, bytes([LINK_BITS]))             # OUT link_bits
    call.note(f"vCPU {vcpu} control block at {control_gfn * PAGE + offset:#x}")
    return 0


def expand_array(channels, call, arg: int) -> int:
    (gfn,) = call.guest.read_struct(arg, "<Q")
    if not isinstance(channels.abi, Fifo):
        raise HypercallError(errno.EOPNOTSUPP, "no FIFO control block yet")   # evtchn_fifo_expand_array
    channels.abi.add_page(gfn)
    call.note(f"event array page {len(channels.abi.pages) - 1} at frame {gfn:#x}")
    return 0


def set_priority(channels, call, arg: int) -> int:
    port, priority = call.guest.read_struct(arg, "<II")
    # evtchn_set_priority: -EINVAL for a port Xen has no struct evtchn for. Xen allocates those in
    # buckets, so it answers 0 for a closed port near open ones (its priority is reset when the port
    # is next allocated); here every closed port is -EINVAL. Either way the priority does not survive.
    channels.port(port)
    channels.abi.set_priority(port, priority)
    call.note(f"port {port} priority {priority}")
    return 0


# -- snapshots: the part of the ``xen.evtchn`` record (xenicorn.xen.evtchn) that is FIFO state ----------
def save_state(abi) -> dict | None:
    """What Xen keeps outside guest memory for the FIFO ABI; None under the 2-level ABI."""
    if not isinstance(abi, Fifo):
        return None
    return {"control": [list(x) for x in sorted(abi.control.items())], "pages": list(abi.pages),
            "priority": [list(x) for x in sorted(abi.priority.items())],
            "lastq": sorted([p, *q] for p, q in abi.lastq.items()),
            "tails": sorted([*q, p] for q, p in abi.tails.items()), "held": sorted(abi.held)}


def check_state(st, xen):
    """State init_control, expand_array and set_priority could have made: control blocks of this domain's
    vCPUs, 8-byte aligned within their page, in RAM; at most 128 array pages, in RAM; priorities 0-15;
    ports below 2^17. None (the 2-level ABI) passes through."""
    if st is None:
        return None
    if not isinstance(st, dict):
        raise RecordError("FIFO state is not an object")
    mem, nvcpus = xen.host.memory, len(xen.host.vcpus)

    def rows(key: str, n: int, most: int) -> list[list[int]]:
        out = []
        for item in listing(st, key, most):
            if not isinstance(item, list) or len(item) != n:
                raise RecordError(f"FIFO {key} entry {item!r}")
            out.append(item)
        return out
    control = {}
    for vcpu, gpa in rows("control", 2, nvcpus):
        vcpu, gpa = integer(vcpu, "FIFO vCPU", 0, nvcpus - 1), integer(gpa, "control block")
        if vcpu in control or gpa % PAGE > PAGE - CONTROL_BLOCK_SIZE or gpa & 7 \
                or not mem.is_ram(gpa, CONTROL_BLOCK_SIZE):
            raise RecordError(f"vCPU {vcpu}'s FIFO control block at {gpa:#x}")
        control[vcpu] = gpa
    if not control:
        raise RecordError("FIFO ABI without a control block")
    pages = [integer(g, "event array frame") for g in listing(st, "pages", MAX_ARRAY_PAGES)]
    if not all(mem.is_ram(g * PAGE, PAGE) for g in pages):
        raise RecordError("an event array page is not RAM")
    port = lambda v: integer(v, "FIFO port", 0, NR_CHANNELS - 1)        # noqa: E731
    prio = lambda v: integer(v, "FIFO priority", 0, PRIORITY_MIN)       # noqa: E731
    vc = lambda v: integer(v, "FIFO vCPU", 0, nvcpus - 1)               # noqa: E731
    priority = {port(p): prio(q) for p, q in rows("priority", 2, NR_CHANNELS)}
    lastq = {port(p): (vc(v), prio(q)) for p, v, q in rows("lastq", 3, NR_CHANNELS)}
    tails = {(vc(v), prio(q)): port(p) for v, q, p in rows("tails", 3, nvcpus * NR_QUEUES)}
    held = {port(p) for p in listing(st, "held", NR_CHANNELS)}
    return control, pages, priority, lastq, tails, held


def restore(channels, prepared) -> Fifo | None:
    """The FIFO ABI as checked; None for the 2-level ABI."""
    if prepared is None:
        return None
    f = Fifo(channels)
    control, pages, priority, lastq, tails, held = prepared
    f.control, f.pages, f.priority = dict(control), list(pages), dict(priority)
    f.lastq, f.tails, f.held = dict(lastq), dict(tails), set(held)
    return f
