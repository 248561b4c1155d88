/* fifo32 / fifo64: the FIFO event-channel ABI, end to end, through one callback.
 *
 * The command line picks how upcalls arrive ("via=...", as the evtchn
 * kernels): vector (type 2, 0xF3), lapic (per-vCPU vector 0xF4), gsi
 * (GSI 20, IOAPIC level, 0x50), intx (the xen-platform device's INTA, GSI 17,
 * 0x51). The handler is Linux's (drivers/xen/events/events_fifo.c): clear
 * upcall_pending, take the control block's ready word, and from the most
 * urgent ready queue follow head[] and the LINKs, clearing LINKED on each
 * word and handling what is PENDING and not MASKED.
 *  1. while still 2-level, a masked port gets an event: init_control keeps
 *     it, and expand_array delivers it once the port's word exists;
 *  2. init_control's hostile arguments (bad vCPU, offset past the page or
 *     unaligned, a frame that is not RAM, a second init) get Xen's errors
 *     and leave the 2-level ABI in place; link_bits is 17;
 *  3. events raised with interrupts off are handled by priority, a low one
 *     sent first arriving after a high one, and in send order within one
 *     queue (the LINK fields chain them);
 *  4. a MASKED port collects sends as one PENDING event, unmask delivers it;
 *  5. set_priority 16 and on a closed port, expand_array beyond 128 pages
 *     and with a bad frame: Xen's errors;
 *  6. EVTCHNOP_reset goes back to 2-level (which works), init_control again
 *     starts FIFO afresh;
 *  7. the state left for the test to inspect: a port at priority 3, a masked
 *     pending port, and an event queued at priority 5 with interrupts off;
 *  8. with -smp 2, vCPU 1's control block (same page, offset 0x800) and an
 *     IPI queued there (vCPU 1 itself is never started).
 * Facts: xen/include/public/event_channel.h, xen/common/event_fifo.c. */
#include "../lib/kernel.h"
#include "../lib/xen.h"

#define __HYPERVISOR_event_channel_op 32
#define __HYPERVISOR_set_timer_op 15
#define EVTCHNOP_alloc_unbound 6
#define EVTCHNOP_close 3
#define EVTCHNOP_send 4
#define EVTCHNOP_bind_ipi 7
#define EVTCHNOP_bind_virq 1
#define EVTCHNOP_unmask 9
#define EVTCHNOP_reset 10
#define EVTCHNOP_init_control 11
#define EVTCHNOP_expand_array 12
#define EVTCHNOP_set_priority 13
#define VIRQ_TIMER 0
#define ENOSPC 28

#define FIFO_PENDING 31
#define FIFO_MASKED 30
#define FIFO_LINKED 29
#define FIFO_BUSY 28
#define LINK_MASK ((1u << 17) - 1)
#define NR_QUEUES 16
#define MAX_PAGES 128

#define LAPIC 0xFEE00000UL
#define IOAPIC 0xFEC00000UL
#define VEC_DIRECT 0xF3
#define VEC_LAPIC 0xF4
#define BITS (sizeof(ulong) * 8)

struct vcpu_info { u8 evtchn_upcall_pending, evtchn_upcall_mask; ulong evtchn_pending_sel; };
struct xen_add_to_physmap { u16 domid, size; u32 space; ulong idx, gpfn; };
struct upcall_vector { u32 vcpu; u8 vector; };
struct evtchn_bind_ipi { u32 vcpu, port; };
struct evtchn_bind_virq { u32 virq, vcpu, port; };
struct evtchn_init_control { u64 control_gfn; u32 offset, vcpu; u8 link_bits, pad[7]; };
struct evtchn_expand_array { u64 array_gfn; };
struct evtchn_set_priority { u32 port, priority; };
struct control_block { u32 ready, rsvd, head[NR_QUEUES]; };


static u8 shared_page[4096] __attribute__((aligned(4096)));
static volatile struct vcpu_info *vi = (volatile struct vcpu_info *)shared_page;
static volatile ulong *pending2l = (volatile ulong *)(shared_page + 0x800);
#ifdef __x86_64__
static volatile ulong *mask2l = (volatile ulong *)(shared_page + 0xA00);
#else
static volatile ulong *mask2l = (volatile ulong *)(shared_page + 0x880);
#endif
u8 control_pages[2][4096] __attribute__((aligned(4096)));       /* the first and, after reset, second block */
u8 event_array[MAX_PAGES][4096] __attribute__((aligned(4096)));
static volatile struct control_block *cb;
static volatile u32 *words = (volatile u32 *)event_array;       /* page 0: ports 0-1023 */
static u32 qhead[NR_QUEUES];                                    /* where each queue's walk stands */

static int fifo_mode;
static volatile u32 events[1024], order[32], norder;
static volatile u32 upcalls, empty_upcalls;
static const char *via = "vector";
static int eoi_kind;                                            /* 0 none, 1 LAPIC */

static inline void apic_write(u32 reg, u32 v) { *(volatile u32 *)(LAPIC + reg) = v; }
static void ioapic_write(u32 reg, u32 v) { *(volatile u32 *)IOAPIC = reg; *(volatile u32 *)(IOAPIC + 0x10) = v; }
static u32 pci_read(int slot, int reg) { outl(0xCF8, 0x80000000u | (slot << 11) | reg); return inl(0xCFC); }
static ulong xchg(volatile ulong *p, ulong v) { __asm__ volatile("xchg %0, %1" : "+r"(v), "+m"(*p) :: "memory"); return v; }
static u32 xchg32(volatile u32 *p, u32 v) { __asm__ volatile("xchg %0, %1" : "+r"(v), "+m"(*p) :: "memory"); return v; }
static u32 cmpxchg32(volatile u32 *p, u32 old, u32 new) {
    __asm__ volatile("lock cmpxchg %2, %1" : "+a"(old), "+m"(*p) : "r"(new) : "memory");
    return old;
}
static void set_bit32(volatile u32 *w, int b) { __asm__ volatile("lock btsl %1, %0" : "+m"(*w) : "r"(b) : "memory"); }
static void clear_bit32(volatile u32 *w, int b) { __asm__ volatile("lock btrl %1, %0" : "+m"(*w) : "r"(b) : "memory"); }
static void set_bit(volatile ulong *w, int b) { __asm__ volatile("lock bts %1, %0" : "+m"(*w) : "r"((ulong)b) : "memory"); }
static void clear_bit(volatile ulong *w, int b) { __asm__ volatile("lock btr %1, %0" : "+m"(*w) : "r"((ulong)b) : "memory"); }
static int ffs_ulong(ulong v) { ulong r; __asm__("bsf %1, %0" : "=r"(r) : "rm"(v)); return (int)r; }

/* the store that clears upcall_pending ends its block (the emulator's poll runs at the next) */
__attribute__((noinline)) static void clear_upcall_pending(void) {
    __asm__ volatile(".globl upcall_clear_store\nupcall_clear_store:\n\t"
                     "movb $0, %0\n\tjmp 1f\n1:\n\t.globl upcall_cleared\nupcall_cleared:"
                     : "=m"(vi->evtchn_upcall_pending) :: "memory");
}

static void handle(u32 port) {
    if (port < 1024)
        events[port]++;
    if (norder < 32)
        order[norder++] = port;
}

/* clear LINKED and the LINK atomically; return the LINK (events_fifo.c's clear_linked) */
static u32 clear_linked(volatile u32 *word) {
    u32 w = *word, old;
    while ((old = cmpxchg32(word, w, w & ~((1u << FIFO_LINKED) | LINK_MASK))) != w)
        w = old;
    return w & LINK_MASK;
}

static void consume_one(int q, u32 *ready) {
    u32 port = qhead[q];
    if (!port)
        port = cb->head[q];                  /* a new run: Xen wrote the head */
    if (!port) {
        *ready &= ~(1u << q);
        return;
    }
    volatile u32 *word = &words[port];
    u32 next = clear_linked(word);
    if (!next)
        *ready &= ~(1u << q);
    u32 w = *word;
    if ((w >> FIFO_PENDING & 1) && !(w >> FIFO_MASKED & 1)) {
        clear_bit32(word, FIFO_PENDING);
        handle(port);
    }
    qhead[q] = next;
}

static int do_fifo(void) {
    int before = (int)norder;
    u32 ready = xchg32(&cb->ready, 0);
    while (ready) {
        consume_one(ffs_ulong(ready), &ready);   /* the lowest bit: the most urgent queue */
        ready |= xchg32(&cb->ready, 0);
    }
    return (int)norder - before;
}

static int do_2l(void) {
    int found = 0;
    ulong sel = xchg(&vi->evtchn_pending_sel, 0);
    while (sel) {
        int w = ffs_ulong(sel);
        sel &= ~(1UL << w);
        ulong bits = pending2l[w] & ~mask2l[w];
        while (bits) {
            int b = ffs_ulong(bits);
            bits &= ~(1UL << b);
            clear_bit(&pending2l[w], b);
            handle((u32)w * BITS + (u32)b);
            found++;
        }
    }
    return found;
}

static void upcall_handler(struct frame *f) {
    (void)f;
    upcalls++;
    clear_upcall_pending();
    if (!(fifo_mode ? do_fifo() : do_2l()))
        empty_upcalls++;
    if (eoi_kind)
        apic_write(0xB0, 0);
}

static void settle(void) { for (int i = 0; i < 50; i++) { (void)inb(0x80); __asm__ volatile("pause"); } }
static void wait_upcalls(u32 n) { for (int i = 0; i < 100000 && upcalls < n; i++) (void)inb(0x80); }

static u64 choose_via(void) {
    apic_write(0xF0, 0x1FF);                               /* LAPIC on; the 8259 stays masked */
    outb(0x21, 0xFF); outb(0xA1, 0xFF);
    if (!strcmp(via, "gsi") || !strcmp(via, "intx")) {
        int gsi = !strcmp(via, "gsi") ? 20 : 17, vec = gsi == 20 ? 0x50 : 0x51;
        eoi_kind = 1;
        set_handler(vec, upcall_handler);
        ioapic_write(0x10 + 2 * gsi + 1, 0);
        ioapic_write(0x10 + 2 * gsi, 0x8000 | vec);        /* level, fixed */
        if (gsi == 20)
            return 20;                                     /* type 0: GSI 20 */
        check(pci_read(2, 0) == 0x00015853, "xen-platform device at 00:02.0");
        return 1ULL << 56 | (2 << 3) << 8 | 0;              /* type 1: 00:02.0 INTA -> GSI 17 */
    }
    if (!strcmp(via, "lapic")) {
        eoi_kind = 1;
        set_handler(VEC_LAPIC, upcall_handler);
        struct upcall_vector uv = { 0, VEC_LAPIC };
        EXPECT(HYPERVISOR(hvm_op, 23, &uv), 0, "HVMOP_set_evtchn_upcall_vector(0xF4)");
        return 0;
    }
    set_handler(VEC_DIRECT, upcall_handler);
    return 2ULL << 56 | VEC_DIRECT;
}

static u32 bind_ipi(void) {
    struct evtchn_bind_ipi b = { 0, 0 };
    EXPECT(EVTCHN(EVTCHNOP_bind_ipi, &b), 0, "bind_ipi(vCPU 0)");
    return b.port;
}
static long send(u32 port) { return EVTCHN(EVTCHNOP_send, &port); }
static long set_priority(u32 port, u32 prio) {
    struct evtchn_set_priority sp = { port, prio };
    return EVTCHN(EVTCHNOP_set_priority, &sp);
}
static long init_control(ulong gfn, u32 offset, u32 vcpu, u8 *link_bits) {
    struct evtchn_init_control ic = { gfn, offset, vcpu, 0, {0} };
    long r = EVTCHN(EVTCHNOP_init_control, &ic);
    if (link_bits)
        *link_bits = ic.link_bits;
    return r;
}
static long expand(ulong gfn) {
    struct evtchn_expand_array ea = { gfn };
    return EVTCHN(EVTCHNOP_expand_array, &ea);
}
static ulong pfn(const void *p) { return (ulong)p >> 12; }

static void start_fifo(u8 *page, u32 offset) {
    memset(event_array[0], 0, 4096);
    memset(qhead, 0, sizeof(qhead));
    cb = (volatile struct control_block *)(page + offset);
    u8 link_bits = 0;
    long r = init_control(pfn(page), offset, 0, &link_bits);
    EXPECT(r, 0, "init_control(vCPU 0)");
    if (r)
        test_result();                                     /* no FIFO ABI (--no-evtchn-fifo): stop here */
    check(link_bits == 17, "link_bits %u", link_bits);
    fifo_mode = 1;
}

void kmain(void) {
    const char *cmdline = (const char *)(ulong)start_info->cmdline_paddr;
    static const char *vias[] = { "vector", "lapic", "gsi", "intx" };
    for (unsigned i = 0; i < sizeof(vias) / sizeof(vias[0]); i++)
        if (cmdline_has(cmdline, "via", vias[i]))
            via = vias[i];
    printf("fifo%d: upcalls via %s\n", (int)BITS, via);
    xen_install_hypercall_page();
    struct xen_add_to_physmap xatp = { DOMID_SELF, 0, 0, 0, pfn(shared_page) };
    EXPECT(HYPERVISOR(memory_op, 7, &xatp), 0, "shared_info mapped");
    EXPECT(hvm_set_param(0, choose_via()), 0, "HVM_PARAM_CALLBACK_IRQ");
    __asm__ volatile("sti");

    /* 1. 2-level first: a masked port's event survives the switch */
    u32 held = bind_ipi();
    EXPECT(set_priority(held, 0), -ENOSYS, "set_priority under the 2-level ABI");
    EXPECT(expand(pfn(event_array[0])), -EOPNOTSUPP, "expand_array before init_control");
    set_bit(&mask2l[0], (int)held);
    send(held);
    settle();
    check(upcalls == 0 && (pending2l[0] >> held & 1), "2-level: port %u pending and masked", held);

    /* 2. init_control: Xen's checks, in its order */
    EXPECT(init_control(pfn(control_pages[0]), 0, 7, 0), -ENOENT, "init_control(vCPU 7)");
    EXPECT(init_control(pfn(control_pages[0]), 4096 - 72 + 8, 0, 0), -EINVAL, "init_control(offset crossing the page)");
    EXPECT(init_control(pfn(control_pages[0]), 4, 0, 0), -EINVAL, "init_control(offset 4, unaligned)");
    EXPECT(init_control(0x100000, 0, 0, 0), -EINVAL, "init_control(frame at 4 GiB, not RAM)");
    EXPECT(expand(pfn(event_array[0])), -EOPNOTSUPP, "still 2-level after the failures");
    start_fifo(control_pages[0], 0x40);
    EXPECT(init_control(pfn(control_pages[0]), 0x40, 0, 0), -EINVAL, "init_control(vCPU 0) twice");
    check(upcalls == 0, "no word for port %u yet: nothing delivered", held);
    EXPECT(expand(pfn(event_array[0])), 0, "expand_array(page 0)");
    wait_upcalls(1);
    check(upcalls == 1 && events[held] == 1 && !empty_upcalls,
          "the event held from the 2-level ABI arrived when its word appeared");

    /* 3. priorities, and FIFO order within a queue */
    u32 lo = bind_ipi(), hi = bind_ipi(), a = bind_ipi(), b = bind_ipi(), c = bind_ipi();
    EXPECT(set_priority(lo, 12), 0, "set_priority(lo, 12)");
    EXPECT(set_priority(hi, 2), 0, "set_priority(hi, 2)");
    __asm__ volatile("cli");
    norder = 0;
    u32 before = upcalls;
    send(lo); send(hi); send(a); send(b); send(c);
    check(vi->evtchn_upcall_pending && cb->ready == (1u << 2 | 1u << 7 | 1u << 12), "ready %#x", cb->ready);
    check(cb->head[12] == lo && cb->head[2] == hi && cb->head[7] == a, "heads: %u %u %u",
          cb->head[2], cb->head[7], cb->head[12]);
    check((words[a] & LINK_MASK) == b && (words[b] & LINK_MASK) == c && (words[c] & LINK_MASK) == 0,
          "LINKs a -> b -> c (%#x %#x %#x)", words[a], words[b], words[c]);
    check(words[lo] >> FIFO_LINKED & 1 && words[lo] >> FIFO_PENDING & 1, "lo is PENDING and LINKED (%#x)", words[lo]);
    __asm__ volatile("sti");
    wait_upcalls(before + 1);
    settle();
    check(upcalls == before + 1 && norder == 5, "one upcall handled all five (%u upcalls, %u events)",
          upcalls - before, norder);
    check(order[0] == hi && order[4] == lo, "priority 2 first, priority 12 last (%u ... %u)", order[0], order[4]);
    check(order[1] == a && order[2] == b && order[3] == c, "priority 7 in send order (%u %u %u)",
          order[1], order[2], order[3]);
    check(!cb->ready && !(words[lo] >> FIFO_LINKED & 1), "queues empty, words unlinked");

    /* 4. masking, and unmask re-raising the pending event */
    set_bit32(&words[a], FIFO_MASKED);
    before = upcalls;
    for (int i = 0; i < 5; i++)
        send(a);
    settle();
    check(upcalls == before && words[a] >> FIFO_PENDING & 1 && !(words[a] >> FIFO_LINKED & 1),
          "masked: PENDING, not LINKED, no upcall (%#x)", words[a]);
    u32 port = a;
    EXPECT(EVTCHN(EVTCHNOP_unmask, &port), 0, "unmask");
    wait_upcalls(before + 1);
    settle();
    check(upcalls == before + 1 && events[a] == 2, "five sends while masked made one event (%u)", events[a] - 1);

    /* 5. hostile arguments */
    EXPECT(set_priority(a, 16), -EINVAL, "set_priority(16)");
    EXPECT(set_priority(900, 1), -EINVAL, "set_priority of a closed port");
    EXPECT(expand(0x100000), -EINVAL, "expand_array(frame at 4 GiB)");
    EXPECT(init_control(pfn(control_pages[1]), 0, 0, 0), -EINVAL, "init_control(vCPU 0) again, another page");
    int added = 1;
    for (int i = 1; i < MAX_PAGES; i++)
        added += expand(pfn(event_array[i])) == 0;
    check(added == MAX_PAGES, "the event array takes %d pages (2^17 ports)", added);
    EXPECT(expand(pfn(event_array[0])), -ENOSPC, "expand_array beyond 128 pages");

    /* VIRQ_TIMER through the queues */
    struct evtchn_bind_virq bv = { VIRQ_TIMER, 0, 0 };
    EXPECT(EVTCHN(EVTCHNOP_bind_virq, &bv), 0, "bind_virq(TIMER)");
    u64 now = 0;
    HYPERVISOR(hvm_op, 10, &now);
    u64 deadline = now + 1000000;
    xen_hypercall(__HYPERVISOR_set_timer_op, (ulong)deadline, (ulong)(deadline >> 32), 0, 0, 0);
    for (int i = 0; i < 1000; i++) {
        __asm__ volatile("cli");
        if (events[bv.port])
            break;
        __asm__ volatile("sti; hlt");
    }
    __asm__ volatile("sti");
    check(events[bv.port] == 1, "VIRQ_TIMER arrived on port %u", bv.port);

    /* 6. reset: back to 2-level, then FIFO afresh */
    u16 dom = DOMID_SELF;
    EXPECT(EVTCHN(EVTCHNOP_reset, &dom), 0, "EVTCHNOP_reset");
    fifo_mode = 0;
    memset((void *)pending2l, 0, 256);                     /* the guest's own bitmaps, stale from before */
    memset((void *)mask2l, 0, 256);
    EXPECT(expand(pfn(event_array[0])), -EOPNOTSUPP, "expand_array after reset: 2-level again");
    u32 two = bind_ipi();
    EXPECT(set_priority(two, 3), -ENOSYS, "no priorities after reset");
    before = upcalls;
    u32 seen = events[two];                                /* port numbers start again from 1 */
    send(two);
    wait_upcalls(before + 1);
    check(upcalls == before + 1 && events[two] == seen + 1, "2-level delivery after reset (port %u)", two);
    port = two;
    EVTCHN(EVTCHNOP_close, &port);
    start_fifo(control_pages[1], 4096 - 72);               /* the last offset Xen accepts */
    EXPECT(expand(pfn(event_array[0])), 0, "expand_array(page 0) again");

    /* 7. state for the test: priority 3, a masked pending port, a queued event */
    u32 p3 = bind_ipi(), m = bind_ipi(), z = bind_ipi();
    EXPECT(set_priority(p3, 3), 0, "set_priority(3)");
    EXPECT(set_priority(z, 5), 0, "set_priority(5)");
    set_bit32(&words[m], FIFO_MASKED);
    send(m);
    __asm__ volatile("cli");
    send(z);
    check(cb->ready == 1u << 5 && cb->head[5] == z, "port %u queued at priority 5", z);

    /* 8. with a second vCPU (-smp 2; it need not run): its own control block and queues */
    if (HYPERVISOR3(vcpu_op, 3, 1, 0) >= 0) {                  /* VCPUOP_is_up: vCPU 1 exists */
        volatile struct control_block *cb1 = (volatile struct control_block *)(control_pages[0] + 0x800);
        volatile struct vcpu_info *vi1 = (volatile struct vcpu_info *)(shared_page + 64);
        EXPECT(init_control(pfn(control_pages[0]), 0x800, 1, 0), 0, "init_control(vCPU 1)");
        struct evtchn_bind_ipi b1 = { 1, 0 };
        EXPECT(EVTCHN(EVTCHNOP_bind_ipi, &b1), 0, "bind_ipi(vCPU 1)");
        before = upcalls;
        send(b1.port);
        check(cb1->ready == 1u << 7 && cb1->head[7] == b1.port && vi1->evtchn_upcall_pending,
              "port %u queued on vCPU 1's queue 7, its upcall pending", b1.port);
        check(cb->ready == 1u << 5 && upcalls == before, "vCPU 0's queues untouched");
        printf("vcpu1 port=%u\n", b1.port);
    }
    printf("ports p3=%u masked=%u queued=%u\n", p3, m, z);
    printf("upcalls %u, empty %u\n", upcalls, empty_upcalls);
}
