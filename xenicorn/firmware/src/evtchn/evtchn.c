/* evtchn32 / evtchn64: event channels and the upcall, through one callback.
 *
 * The command line picks how upcalls arrive ("via=..."):
 *   vector   HVM_PARAM_CALLBACK_IRQ type 2: vector 0xF3 injected directly
 *   lapic    HVMOP_set_evtchn_upcall_vector: vector 0xF4 through the LAPIC
 *   gsi      type 0, GSI 20 through the IOAPIC (level, vector 0x50)
 *   pic      type 0, GSI 10 through the 8259 (ELCR level, vector 0x2A)
 *   intx     type 1, the xen-platform device's INTA (00:02.0): PIRQ B, GSI 17
 *            through the IOAPIC (vector 0x51)
 *   intxpic  type 1 again, PIRQ B routed by the PIIX3 to 8259 IRQ 11 (0x2B)
 * Then, with that callback:
 *  1. an IPI port and a loopback interdomain pair deliver to the handler,
 *     which does what Linux does: clear upcall_pending, swap pending_sel
 *     with 0, scan pending & ~mask and clear what it handles;
 *  2. a masked port coalesces five sends into one pending bit, and unmask
 *     delivers it once;
 *  3. the guest setting its own upcall_pending raises nothing;
 *  4. level callbacks: after the handler cleared the flag and EOId, the
 *     line is low: nothing arrives again (a high line would be redelivered);
 *  5. VIRQ_TIMER from a one-shot Xen timer, and the UART's GSI 4 as a PIRQ
 *     event (PHYSDEVOP_map_pirq, EVTCHNOP_bind_pirq);
 *  6. switching the callback while an upcall is pending re-delivers it;
 *  7. hostile arguments get Xen's errors.
 * xen/include/public/event_channel.h, hvm/params.h, physdev.h. */
#include "../lib/kernel.h"
#include "../lib/xen.h"

#define __HYPERVISOR_event_channel_op 32
#define __HYPERVISOR_physdev_op 33
#define __HYPERVISOR_set_timer_op 15
#define EVTCHNOP_bind_interdomain 0
#define EVTCHNOP_bind_virq 1
#define EVTCHNOP_bind_pirq 2
#define EVTCHNOP_close 3
#define EVTCHNOP_send 4
#define EVTCHNOP_status 5
#define EVTCHNOP_alloc_unbound 6
#define EVTCHNOP_bind_ipi 7
#define EVTCHNOP_bind_vcpu 8
#define EVTCHNOP_unmask 9
#define EVTCHNOP_set_priority 13
#define PHYSDEVOP_eoi 12
#define PHYSDEVOP_map_pirq 13
#define MAP_PIRQ_TYPE_GSI 1
#define VIRQ_TIMER 0
#define VIRQ_CONSOLE 2
#define EEXIST 17
#define EBUSY 16

#define LAPIC 0xFEE00000UL
#define IOAPIC 0xFEC00000UL
#define VEC_DIRECT 0xF3
#define VEC_LAPIC 0xF4
#define BITS (sizeof(ulong) * 8)

struct vcpu_info {
    u8 evtchn_upcall_pending, evtchn_upcall_mask;
    ulong evtchn_pending_sel;
};
struct xen_add_to_physmap { u16 domid, size; u32 space; ulong idx, gpfn; };
struct upcall_vector { u32 vcpu; u8 vector; };
struct evtchn_alloc_unbound { u16 dom, remote_dom; u32 port; };
struct evtchn_bind_interdomain { u16 remote_dom; u32 remote_port, local_port; };
struct evtchn_bind_virq { u32 virq, vcpu, port; };
struct evtchn_bind_ipi { u32 vcpu, port; };
struct evtchn_bind_pirq { u32 pirq, flags, port; };
struct evtchn_bind_vcpu { u32 port, vcpu; };
struct evtchn_status { u16 dom; u32 port, status, vcpu; u32 u[2]; };
struct physdev_map_pirq { u16 domid; int type, index, pirq, bus, devfn, entry_nr; u64 table_base; };


static u8 shared_page[4096] __attribute__((aligned(4096)));
static volatile struct vcpu_info *vi = (volatile struct vcpu_info *)shared_page;
static volatile ulong *pending = (volatile ulong *)(shared_page + 0x800);
#ifdef __x86_64__
static volatile ulong *mask = (volatile ulong *)(shared_page + 0xA00);
#else
static volatile ulong *mask = (volatile ulong *)(shared_page + 0x880);
#endif

static volatile u32 events[64];            /* events handled, by port */
static volatile u32 upcalls, empty_upcalls;
static const char *via = "vector";
static int level_via;                      /* gsi, pic, intx, intxpic: a level line */
static int eoi_kind;                       /* 0 none, 1 LAPIC (IOAPIC broadcast), 2 8259 */

static inline u32 apic_read(u32 reg) { return *(volatile u32 *)(LAPIC + reg); }
static inline void apic_write(u32 reg, u32 v) { *(volatile u32 *)(LAPIC + reg) = v; }
static void ioapic_write(u32 reg, u32 v) { *(volatile u32 *)IOAPIC = reg; *(volatile u32 *)(IOAPIC + 0x10) = v; }
static u32 pci_read(int slot, int reg) { outl(0xCF8, 0x80000000u | (slot << 11) | reg); return inl(0xCFC); }
static void pci_write8(int slot, int reg, u8 v) {
    outl(0xCF8, 0x80000000u | (slot << 11) | (reg & ~3));
    outb(0xCFC + (reg & 3), v);
}

static ulong xchg(volatile ulong *p, ulong v) {
    __asm__ volatile("xchg %0, %1" : "+r"(v), "+m"(*p) :: "memory");
    return v;
}
static void set_bit(volatile ulong *w, int b) { __asm__ volatile("lock bts %1, %0" : "+m"(*w) : "r"((ulong)b) : "memory"); }
static void clear_bit(volatile ulong *w, int b) { __asm__ volatile("lock btr %1, %0" : "+m"(*w) : "r"((ulong)b) : "memory"); }
static int ffs_ulong(ulong v) { ulong r; __asm__("bsf %1, %0" : "=r"(r) : "rm"(v)); return (int)r; }

/* The store that clears upcall_pending ends its block: the emulator's poll
 * (if any) runs at the next block start, upcall_cleared. */
__attribute__((noinline)) static void clear_upcall_pending(void) {
    __asm__ volatile(".globl upcall_clear_store\nupcall_clear_store:\n\t"
                     "movb $0, %0\n\tjmp 1f\n1:\n\t.globl upcall_cleared\nupcall_cleared:"
                     : "=m"(vi->evtchn_upcall_pending) :: "memory");
}

static void do_upcall(void) {
    upcalls++;
    clear_upcall_pending();
    ulong sel = xchg(&vi->evtchn_pending_sel, 0);
    int found = 0;
    while (sel) {
        int w = ffs_ulong(sel);
        sel &= ~(1UL << w);
        ulong bits = pending[w] & ~mask[w];
        while (bits) {
            int b = ffs_ulong(bits);
            bits &= ~(1UL << b);
            clear_bit(&pending[w], b);
            u32 port = (u32)w * BITS + (u32)b;
            if (port < 64)
                events[port]++;
            found++;
        }
    }
    if (!found)
        empty_upcalls++;
}

static void upcall_handler(struct frame *f) {
    (void)f;
    do_upcall();
    if (eoi_kind == 1)
        apic_write(0xB0, 0);                               /* LAPIC EOI (broadcast to the IOAPIC) */
    else if (eoi_kind == 2) {
        if (f->vector >= 0x28)
            outb(0xA0, 0x20);
        outb(0x20, 0x20);
    }
}

static void settle(void) {
    /* give a wrongly still-asserted line every chance to be delivered again */
    for (int i = 0; i < 50; i++) {
        (void)inb(0x80);
        __asm__ volatile("pause");
    }
}

static void wait_upcalls(u32 n) {
    for (int i = 0; i < 100000 && upcalls < n; i++)
        (void)inb(0x80);
}

static void setup_controllers(void) {
    apic_write(0xF0, 0x1FF);                               /* LAPIC on, spurious 0xFF */
    /* 8259: remapped to 0x20/0x28, everything masked for now */
    outb(0x20, 0x11); outb(0x21, 0x20); outb(0x21, 0x04); outb(0x21, 0x01);
    outb(0xA0, 0x11); outb(0xA1, 0x28); outb(0xA1, 0x02); outb(0xA1, 0x01);
    outb(0x21, 0xFF); outb(0xA1, 0xFF);
}

static u64 choose_via(void) {
    if (!strcmp(via, "vector")) {
        set_handler(VEC_DIRECT, upcall_handler);
        return 2ULL << 56 | VEC_DIRECT;
    }
    if (!strcmp(via, "gsi")) {
        level_via = 1; eoi_kind = 1;
        set_handler(0x50, upcall_handler);
        ioapic_write(0x10 + 2 * 20 + 1, 0);
        ioapic_write(0x10 + 2 * 20, 0x8000 | 0x50);        /* level, fixed, vector 0x50 */
        return 20;                                         /* type 0: GSI 20 */
    }
    if (!strcmp(via, "pic")) {
        level_via = 1; eoi_kind = 2;
        set_handler(0x2A, upcall_handler);
        outb(0x4D1, inb(0x4D1) | (1 << 2));                /* ELCR: IRQ 10 level */
        outb(0x21, ~(1 << 2) & 0xFF);                      /* cascade */
        outb(0xA1, ~(1 << 2) & 0xFF);                      /* IRQ 10 */
        return 10;
    }
    if (!strcmp(via, "intx") || !strcmp(via, "intxpic")) {
        check(pci_read(2, 0) == 0x00015853, "xen-platform device at 00:02.0");
        u8 pin = (u8)(pci_read(2, 0x3C) >> 8);
        check(pin == 1, "its interrupt pin is INTA (%u)", pin);
        level_via = 1;
        if (!strcmp(via, "intx")) {
            eoi_kind = 1;
            set_handler(0x51, upcall_handler);             /* slot 2 INTA -> PIRQ B -> GSI 17 */
            ioapic_write(0x10 + 2 * 17 + 1, 0);
            ioapic_write(0x10 + 2 * 17, 0x8000 | 0x51);
        } else {
            eoi_kind = 2;
            set_handler(0x2B, upcall_handler);
            pci_write8(1, 0x61, 11);                       /* PIIX3: PIRQB -> IRQ 11 */
            outb(0x4D1, inb(0x4D1) | (1 << 3));            /* ELCR: IRQ 11 level */
            outb(0x21, ~(1 << 2) & 0xFF);
            outb(0xA1, ~(1 << 3) & 0xFF);
        }
        return 1ULL << 56 | (2 << 3) << 8 | 0;              /* type 1: 00:02.0 INTA */
    }
    /* lapic: a per-vCPU vector; the global via stays "none" */
    eoi_kind = 1;
    set_handler(VEC_LAPIC, upcall_handler);
    struct upcall_vector uv = { 0, VEC_LAPIC };
    EXPECT(HYPERVISOR(hvm_op, 23, &uv), 0, "HVMOP_set_evtchn_upcall_vector(0xF4)");
    return 0;
}

static u32 alloc_self(void) {
    struct evtchn_alloc_unbound a = { DOMID_SELF, DOMID_SELF, 0 };
    EXPECT(EVTCHN(EVTCHNOP_alloc_unbound, &a), 0, "alloc_unbound(self)");
    return a.port;
}

/* "n=N": measure instead of test (benchmarks/evtchn.py) */
static ulong arg_num(const char *cmdline, const char *key) {
    ulong k = strlen(key), n = 0;
    for (const char *w = cmdline; w && *w; w++)
        if ((w == cmdline || w[-1] == ' ') && !memcmp(w, key, k) && w[k] == '=') {
            for (w += k + 1; *w >= '0' && *w <= '9'; w++)
                n = n * 10 + (*w - '0');
            return n;
        }
    return 0;
}

static void mask_callback_input(int masked) {
    if (!strcmp(via, "gsi"))
        ioapic_write(0x10 + 2 * 20, (masked ? 0x10000 : 0) | 0x8000 | 0x50);
    else if (!strcmp(via, "intx"))
        ioapic_write(0x10 + 2 * 17, (masked ? 0x10000 : 0) | 0x8000 | 0x51);
    else
        outb(0xA1, masked ? 0xFF : ~(1 << (!strcmp(via, "pic") ? 2 : 3)) & 0xFF);
}

static int events_ok(ulong n, u32 port) { return events[port] == (u32)(n + 1) && !empty_upcalls; }

static ulong compute(ulong n) {
    ulong s = 0;
    for (ulong i = 0; i < n; i++)
        s += i ^ (s >> 3);
    return s;
}

static void bench(ulong n, u32 port) {
    u32 send = port;
    u64 t0 = rdtsc();
    for (ulong i = 0; i < n; i++) {
        EVTCHN(EVTCHNOP_send, &send);
        while (upcalls != i + 1)
            __asm__ volatile("pause");
    }
    u64 events = rdtsc() - t0;
    printf("bench events %lu cycles %llu\n", n, (unsigned long long)events);
    /* The same work with the callback line held asserted, then low. The
     * controller input is masked meanwhile, so no interrupt is pending:
     * what slows the guest down is only the deassert poll, if any. */
    ulong work = n * 200;
    if (!level_via) {
        printf("bench compute %lu asserted n/a deasserted n/a\n", work);
        check(events_ok(n - 1, port), "every event was handled");
        return;
    }
    mask_callback_input(1);
    EVTCHN(EVTCHNOP_send, &send);
    t0 = rdtsc();
    volatile ulong sink = compute(work);
    u64 asserted = rdtsc() - t0;
    mask_callback_input(0);
    while (upcalls != n + 1)
        __asm__ volatile("pause");
    t0 = rdtsc();
    sink = compute(work);
    u64 low = rdtsc() - t0;
    (void)sink;
    printf("bench compute %lu asserted %llu deasserted %llu\n", work, (unsigned long long)asserted,
           (unsigned long long)low);
    check(events_ok(n, port), "every event was handled");
}

void kmain(void) {
    const char *cmdline = (const char *)(ulong)start_info->cmdline_paddr;
    static const char *vias[] = { "vector", "lapic", "gsi", "pic", "intx", "intxpic" };
    for (unsigned i = 0; i < sizeof(vias) / sizeof(vias[0]); i++)
        if (cmdline_has(cmdline, "via", vias[i]))
            via = vias[i];
    printf("evtchn%d: upcalls via %s\n", (int)BITS, via);
    xen_install_hypercall_page();
    struct xen_add_to_physmap xatp = { DOMID_SELF, 0, 0, 0, (ulong)shared_page >> 12 };
    EXPECT(HYPERVISOR(memory_op, 7, &xatp), 0, "shared_info mapped");
    setup_controllers();
    u64 param = choose_via();
    EXPECT(hvm_set_param(0, param), 0, "HVM_PARAM_CALLBACK_IRQ");
    __asm__ volatile("sti");
    ulong n = arg_num(cmdline, "n");
    if (n) {
        struct evtchn_bind_ipi bench_ipi = { 0, 0 };
        EXPECT(EVTCHN(EVTCHNOP_bind_ipi, &bench_ipi), 0, "bind_ipi(vCPU 0)");
        bench(n, bench_ipi.port);
        return;
    }

    /* 1. an IPI port and a loopback pair */
    struct evtchn_bind_ipi ipi = { 0, 0 };
    EXPECT(EVTCHN(EVTCHNOP_bind_ipi, &ipi), 0, "bind_ipi(vCPU 0)");
    u32 send = ipi.port;
    EXPECT(EVTCHN(EVTCHNOP_send, &send), 0, "send on the IPI port");
    wait_upcalls(1);
    check(upcalls == 1 && events[ipi.port] == 1, "IPI event %u delivered once (%u upcalls)", ipi.port, upcalls);
    check(!vi->evtchn_upcall_pending && !vi->evtchn_pending_sel && !pending[0], "handler left nothing pending");
    u32 a = alloc_self();
    struct evtchn_bind_interdomain bi = { DOMID_SELF, a, 0 };
    EXPECT(EVTCHN(EVTCHNOP_bind_interdomain, &bi), 0, "bind_interdomain(self, unbound port)");
    u32 b = bi.local_port;
    send = b;
    EXPECT(EVTCHN(EVTCHNOP_send, &send), 0, "send on the loopback's second end");
    wait_upcalls(2);
    check(events[a] == 1 && events[b] == 0, "the event arrived on the peer %u", a);
    send = a;
    EVTCHN(EVTCHNOP_send, &send);
    wait_upcalls(3);
    check(events[b] == 1, "and back on %u", b);
    struct evtchn_status st = { DOMID_SELF, b, 0, 0, {0, 0} };
    EXPECT(EVTCHN(EVTCHNOP_status, &st), 0, "status of the loopback end");
    check(st.status == 2 && st.u[1] == a, "it is interdomain, peer %u (status %u)", st.u[1], st.status);

    /* 2. masked: five sends coalesce; unmask delivers once */
    set_bit(&mask[0], (int)ipi.port);
    u32 before = upcalls;
    for (int i = 0; i < 5; i++) {
        send = ipi.port;
        EVTCHN(EVTCHNOP_send, &send);
    }
    settle();
    check(upcalls == before && (pending[0] >> ipi.port & 1), "masked: pending set, no upcall");
    u32 port = ipi.port;                                   /* Xen clears the mask and delivers */
    EXPECT(EVTCHN(EVTCHNOP_unmask, &port), 0, "unmask");
    wait_upcalls(before + 1);
    settle();
    check(upcalls == before + 1 && events[ipi.port] == 2, "five sends while masked made one event (%u)",
          events[ipi.port] - 1);

    /* 3. the guest's own upcall_pending raises nothing */
    before = upcalls;
    vi->evtchn_upcall_pending = 1;
    settle();
    check(upcalls == before, "setting upcall_pending ourselves raised no upcall");
    vi->evtchn_upcall_pending = 0;

    /* 4. the level line is low after clear + EOI: nothing is redelivered */
    if (level_via)
        check(empty_upcalls == 0, "no spurious upcall from a line left high (%u)", empty_upcalls);

    /* 5. VIRQ_TIMER from a Xen one-shot timer; the UART's GSI 4 as a PIRQ */
    struct evtchn_bind_virq bv = { VIRQ_TIMER, 0, 0 };
    EXPECT(EVTCHN(EVTCHNOP_bind_virq, &bv), 0, "bind_virq(TIMER)");
    before = upcalls;
    u64 now = 0;
    HYPERVISOR(hvm_op, 10, &now);
    u64 deadline = now + 1000000;
    EXPECT(xen_hypercall(__HYPERVISOR_set_timer_op, (ulong)deadline, (ulong)(deadline >> 32), 0, 0, 0), 0,
           "set_timer_op(+1 ms)");
    /* check with interrupts off, then "sti; hlt": the upcall cannot slip in
     * between the check and the HLT (the STI shadow covers the HLT) */
    for (int i = 0; i < 1000; i++) {
        __asm__ volatile("cli");
        if (events[bv.port])
            break;
        __asm__ volatile("sti; hlt");
    }
    __asm__ volatile("sti");
    check(events[bv.port] == 1, "VIRQ_TIMER arrived on port %u", bv.port);
    struct physdev_map_pirq mp = { DOMID_SELF, MAP_PIRQ_TYPE_GSI, 4, -1, 0, 0, 0, 0 };
    EXPECT(xen_hypercall(__HYPERVISOR_physdev_op, PHYSDEVOP_map_pirq, (ulong)&mp, 0, 0, 0), 0, "map_pirq(GSI 4)");
    struct evtchn_bind_pirq bp = { (u32)mp.pirq, 0, 0 };
    EXPECT(EVTCHN(EVTCHNOP_bind_pirq, &bp), 0, "bind_pirq");
    outb(0x3FC, 0x08);                                     /* UART: MCR.OUT2 lets IRQ 4 out */
    outb(0x3F9, 0x02);                                     /* THR-empty interrupt on */
    for (int i = 0; i < 1000 && !events[bp.port]; i++)
        (void)inb(0x80);
    check(events[bp.port] == 1, "the UART's IRQ 4 arrived as PIRQ %d on port %u", mp.pirq, bp.port);
    (void)inb(0x3FA);
    outb(0x3F9, 0);
    outb(0x3FC, 0);
    u32 eoi = (u32)mp.pirq;
    EXPECT(xen_hypercall(__HYPERVISOR_physdev_op, PHYSDEVOP_eoi, (ulong)&eoi, 0, 0, 0), 0, "PHYSDEVOP_eoi");
    EXPECT(EVTCHN(EVTCHNOP_bind_pirq, &bp), -EBUSY, "bind_pirq twice");

    /* 6. switch the via with an upcall pending: it is delivered again */
    if (strcmp(via, "lapic")) {
        __asm__ volatile("cli");
        send = ipi.port;
        before = upcalls;
        EVTCHN(EVTCHNOP_send, &send);
        set_handler(VEC_DIRECT, upcall_handler);
        int was_level = level_via;
        EXPECT(hvm_set_param(0, 2ULL << 56 | VEC_DIRECT), 0, "switch to the vector callback");
        if (was_level) {
            eoi_kind = 0;                                  /* an interrupt the line raised before is EOId later */
        }
        __asm__ volatile("sti");
        wait_upcalls(before + 1);
        check(upcalls >= before + 1 && events[ipi.port] == 3, "the pending upcall arrived through the new via");
        if (was_level) {
            apic_write(0xB0, 0); outb(0xA0, 0x20); outb(0x20, 0x20);
        }
    }

    /* 7. hostile arguments */
    EXPECT(EVTCHN(EVTCHNOP_bind_virq, &bv), -EEXIST, "bind_virq(TIMER) twice");
    struct evtchn_bind_virq bad_virq = { 1000, 0, 0 };
    EXPECT(EVTCHN(EVTCHNOP_bind_virq, &bad_virq), -EINVAL, "bind_virq(1000)");
    struct evtchn_bind_virq global_on_1 = { VIRQ_CONSOLE, 1, 0 };
    EXPECT(EVTCHN(EVTCHNOP_bind_virq, &global_on_1), -EINVAL, "global VIRQ on vCPU 1");
    struct evtchn_bind_ipi bad_ipi = { 7, 0 };
    EXPECT(EVTCHN(EVTCHNOP_bind_ipi, &bad_ipi), -ENOENT, "bind_ipi(vCPU 7)");
    struct evtchn_bind_vcpu bvc = { ipi.port, 3 };
    EXPECT(EVTCHN(EVTCHNOP_bind_vcpu, &bvc), -ENOENT, "bind_vcpu(vCPU 3)");
    port = 5000;
    EXPECT(EVTCHN(EVTCHNOP_send, &port), -EINVAL, "send on port 5000");
    port = 0;
    EXPECT(EVTCHN(EVTCHNOP_close, &port), -EINVAL, "close port 0");
    port = a;
    EXPECT(EVTCHN(EVTCHNOP_close, &port), 0, "close a loopback end");
    EXPECT(EVTCHN(EVTCHNOP_close, &port), -EINVAL, "close it again");
    EXPECT(EVTCHN(EVTCHNOP_send, &port), -EINVAL, "send on the closed port");
    st.port = b;
    EVTCHN(EVTCHNOP_status, &st);
    check(st.status == 1, "its peer went back to unbound (status %u)", st.status);
    EXPECT(EVTCHN(EVTCHNOP_send, (void *)0xC0000000UL), -EFAULT, "send with a bad pointer");
    struct { u32 port, priority; } prio = { ipi.port, 0 };  /* the 2-level ABI has no priorities */
    EXPECT(EVTCHN(EVTCHNOP_set_priority, &prio), -ENOSYS, "FIFO set_priority");
    EXPECT(EVTCHN(99, &port), -ENOSYS, "event_channel_op 99");
    struct evtchn_alloc_unbound other = { 5, DOMID_SELF, 0 };
    EXPECT(EVTCHN(EVTCHNOP_alloc_unbound, &other), -ESRCH, "alloc_unbound for domain 5");
    __asm__ volatile("cli");
    printf("upcalls %u, empty %u\n", upcalls, empty_upcalls);
}
