/* The Xen part of smp32 / smp64: per-vCPU event delivery and the Xen way
 * of starting a vCPU. Runs only when CPUID names Xen.
 *
 * Xen's rule (xen/arch/x86/hvm/irq.c, hvm_assert_evtchn_irq): an event for
 * a vCPU sets that vCPU's vcpu_info.evtchn_upcall_pending; then
 *   - a per-vCPU upcall vector (HVMOP_set_evtchn_upcall_vector) is raised
 *     in that vCPU's own local APIC;
 *   - else the callback via of HVM_PARAM_CALLBACK_IRQ is asserted, and a
 *     GSI or PCI INTx via only for vCPU 0: an event for vCPU 1 raises no
 *     interrupt at all and only its upcall_pending tells.
 * Setting the vector calls hvm_assert_evtchn_irq at once
 * (xen/arch/x86/hvm/hvm.c, hvmop_set_evtchn_upcall_vector), so an event
 * already pending reaches the handler without another send.
 *
 *  1. Early (before the APs start): the hypercall page, shared_info, and
 *     VCPUOP_register_vcpu_info for each AP's vCPU (64 bytes each in one
 *     page; vCPU 0 keeps shared_info's vcpu_info[0]). The callback is GSI 20
 *     (HVM_PARAM_CALLBACK_IRQ type 0), IOAPIC pin 20 level-triggered to the
 *     BSP on vector 0x50.
 *  2. With 3 or more CPUs the last one starts through VCPUOP_initialise
 *     (struct vcpu_hvm_context, xen/include/public/hvm/hvm_vcpu.h: 32-bit
 *     flat mode in smp32, long mode in smp64) and VCPUOP_up
 *     (xen/include/public/vcpu.h) instead of INIT-SIPI-SIPI. A vCPU that
 *     SIPI started is initialised already: VCPUOP_initialise says -EEXIST
 *     (xen/arch/x86/domain.c, arch_initialise_vcpu).
 *  3. vCPU 1 binds an IPI port (EVTCHNOP_bind_ipi binds to the vCPU named
 *     in the struct, xen/common/event_channel.c; vCPU 1 issues it for
 *     itself, as Linux does), vCPU 0 sends: vCPU 1's upcall_pending is 1,
 *     no GSI reaches vCPU 0. vCPU 1 sets its upcall vector 0xF4: its
 *     handler runs and takes the event; a second send arrives the same way.
 *  4. An IPI port of vCPU 0: the event comes through the GSI.
 *  5. SCHEDOP_poll with no timeout on a *masked* port of vCPU 0, which
 *     vCPU 1 sends on a little later: the send wakes the poller though the
 *     mask keeps any upcall away (xen/common/event_channel.c,
 *     evtchn_check_pollers). Linux's PV spinlocks wait this way: the
 *     kicker port is masked (disable_irq) and xen_qlock_wait polls it.
 * xen/include/public: xen.h (vcpu_info, shared_info), event_channel.h,
 * hvm/hvm_op.h, hvm/params.h, arch-x86/cpuid.h (leaf 4: the vCPU id). */
#include "smp.h"
#include "../lib/xen.h"

#define __HYPERVISOR_event_channel_op 32
#define EVTCHNOP_send 4
#define EVTCHNOP_bind_ipi 7
#define SCHEDOP_poll 3
#define VCPUOP_initialise 0
#define VCPUOP_up 1
#define VCPUOP_is_up 3
#define VCPUOP_register_vcpu_info 10
#define HVMOP_set_param 0
#define HVMOP_set_evtchn_upcall_vector 23
#define HVM_PARAM_CALLBACK_IRQ 0
#define XENMEM_add_to_physmap 7
#define XENMAPSPACE_shared_info 0
#define XEN_HVM_CPUID_VCPU_ID_PRESENT (1u << 3)
#define EEXIST 17
#define CALLBACK_GSI 20
#define BITS (sizeof(ulong) * 8)
#define NPORTS 64


/* struct vcpu_info (xen.h): arch_vcpu_info is cr2 and padding, 64 bytes in all */
struct vcpu_info {
    u8 evtchn_upcall_pending, evtchn_upcall_mask;
    ulong evtchn_pending_sel;
    ulong arch[sizeof(ulong) == 8 ? 2 : 6];
    struct vcpu_time_info time;
};
_Static_assert(sizeof(struct vcpu_info) == 64, "vcpu_info is 64 bytes");

struct xen_add_to_physmap { u16 domid, size; u32 space; ulong idx, gpfn; };
struct upcall_vector { u32 vcpu; u8 vector; };
struct evtchn_bind_ipi { u32 vcpu, port; };
struct vcpu_register_vcpu_info { u64 mfn; u32 offset, rsvd; };
struct sched_poll { u32 *ports; u32 nr_ports; u64 timeout; };   /* sched.h */

struct vcpu_hvm_x86_32 {
    u32 eax, ecx, edx, ebx, esp, ebp, esi, edi, eip, eflags;
    u32 cr0, cr3, cr4, pad1;
    u64 efer;
    u32 cs_base, ds_base, ss_base, es_base, tr_base;
    u32 cs_limit, ds_limit, ss_limit, es_limit, tr_limit;
    u16 cs_ar, ds_ar, ss_ar, es_ar, tr_ar, pad2[3];
};
struct vcpu_hvm_x86_64 {
    u64 rax, rcx, rdx, rbx, rsp, rbp, rsi, rdi, rip, rflags;
    u64 cr0, cr3, cr4, efer;
};
struct vcpu_hvm_context {
    u32 mode, pad;                         /* VCPU_HVM_MODE_32B 0, VCPU_HVM_MODE_64B 1 */
    union { struct vcpu_hvm_x86_32 x86_32; struct vcpu_hvm_x86_64 x86_64; } __attribute__((aligned(8))) cpu_regs;
};

_Static_assert(sizeof(struct vcpu_hvm_context) == 128, "vcpu_hvm_context is 128 bytes");

static u8 shared_page[4096] __attribute__((aligned(4096)));
static u8 vcpu_info_page[4096] __attribute__((aligned(4096)));
static volatile struct vcpu_info *vinfo[MAX_CPUS];
static volatile ulong *pending = (volatile ulong *)(shared_page + 0x800);   /* after vcpu_info[32] */
static volatile ulong *evmask = (volatile ulong *)(shared_page + 0x800 + BITS * sizeof(ulong));
static volatile u32 port_owner[NPORTS];    /* slot + 1 of the vCPU a port is bound to */
static volatile u32 events[NPORTS];        /* events handled, by port */
static volatile long xen_rc[MAX_CPUS];     /* an AP's hypercall result */
static u8 xen_boot_stack[512] __attribute__((aligned(16)));
#ifdef __x86_64__
extern u8 ap_entry64_xen[];
#else
static u32 xen_ap_tss[26];                 /* TR must be a present busy TSS (check_segment) */
extern u8 ap_entry32[];
#endif

static ulong xchg(volatile ulong *p, ulong v) {
    __asm__ volatile("xchg %0, %1" : "+r"(v), "+m"(*p) :: "memory");
    return v;
}
static void set_bit(volatile ulong *w, int b) {
    __asm__ volatile("lock bts %1, %0" : "+m"(*w) : "r"((ulong)b) : "memory");
}
static void clear_bit(volatile ulong *w, int b) {
    __asm__ volatile("lock btr %1, %0" : "+m"(*w) : "r"((ulong)b) : "memory");
}
static int ffs_ulong(ulong v) { ulong r; __asm__("bsf %1, %0" : "=r"(r) : "rm"(v)); return (int)r; }
static void ioapic_write(u32 reg, u32 v) {
    *(volatile u32 *)(ulong)ioapic_base = reg;
    *(volatile u32 *)(ulong)(ioapic_base + 0x10) = v;
}

/* What Linux's handler does: clear upcall_pending, take pending_sel, scan
 * pending & ~mask in those words; here only the ports bound to this vCPU. */
static void handle_events(int s) {
    volatile struct vcpu_info *v = vinfo[s];
    v->evtchn_upcall_pending = 0;
    ulong sel = xchg(&v->evtchn_pending_sel, 0);
    while (sel) {
        int w = ffs_ulong(sel);
        sel &= ~(1UL << w);
        ulong bits = pending[w] & ~evmask[w];
        while (bits) {
            int b = ffs_ulong(bits);
            bits &= ~(1UL << b);
            u32 port = (u32)w * BITS + (u32)b;
            if (port < NPORTS && port_owner[port] == (u32)s + 1) {
                clear_bit(&pending[w], b);
                events[port]++;
            }
        }
    }
}

static void on_upcall(struct frame *f, int kind) {
    int s = my_slot();
    if (s >= 0 && vinfo[s]) {
        cpus[s].hits[kind]++;
        handle_events(s);
    }
    apic_write(APIC_EOI, 0);               /* for the GSI, also the IOAPIC's EOI (broadcast) */
}
static void on_gsi(struct frame *f) { on_upcall(f, HIT_GSI); }
static void on_vector(struct frame *f) { on_upcall(f, HIT_UPCALL); }

void xen_identify(int slot) {
    u32 a, b, c, d, base = xen_cpuid_base();
    cpuid(base + 4, 0, &a, &b, &c, &d);
    cpus[slot].vcpu_id = (a & XEN_HVM_CPUID_VCPU_ID_PRESENT) ? b : ~0u;
}

/* The vCPU id Xen knows a CPU by: CPUID's if it said, else the MADT's UID */
static u32 vcpu_of(int slot) { return cpus[slot].vcpu_id != ~0u ? cpus[slot].vcpu_id : cpus[slot].acpi_uid; }

void xen_early(void) {
    xen_install_hypercall_page();
    xen_identify(0);
    struct xen_add_to_physmap xatp = { DOMID_SELF, 0, XENMAPSPACE_shared_info, 0, (ulong)shared_page >> 12 };
    long rc = HYPERVISOR(memory_op, XENMEM_add_to_physmap, &xatp);
    check(rc == 0, "Xen: shared_info mapped (%ld); the BSP is vCPU %u", rc, vcpu_of(0));
    u32 v0 = vcpu_of(0);
    if (v0 < 32)
        vinfo[0] = (volatile struct vcpu_info *)(shared_page + 64 * v0);
    /* Linux registers a secondary vCPU's vcpu_info before starting it, naming
     * it by the processor's ACPI id (xen_cpu_up_prepare_hvm) */
    for (int s = 1; s < ncpus; s++) {
        struct vcpu_register_vcpu_info r = { (ulong)vcpu_info_page >> 12, 64 * (u32)s, 0 };
        rc = HYPERVISOR3(vcpu_op, VCPUOP_register_vcpu_info, cpus[s].acpi_uid, &r);
        check(rc == 0, "VCPUOP_register_vcpu_info(vCPU %u) at %p (%ld)", cpus[s].acpi_uid,
              (void *)(vcpu_info_page + 64 * s), rc);
        if (rc == 0)
            vinfo[s] = (volatile struct vcpu_info *)(vcpu_info_page + 64 * s);
        else if (cpus[s].acpi_uid < 32)
            vinfo[s] = (volatile struct vcpu_info *)(shared_page + 64 * cpus[s].acpi_uid);
    }
    for (int s = 0; s < ncpus; s++)
        if (vinfo[s])
            vinfo[s]->evtchn_upcall_mask = 0;
    set_handler(VEC_GSI, on_gsi);
    set_handler(VEC_UPCALL, on_vector);
    ioapic_write(0x10 + 2 * CALLBACK_GSI + 1, cpus[0].apic_id << 24);   /* physical, to the BSP */
    ioapic_write(0x10 + 2 * CALLBACK_GSI, 0x8000 | VEC_GSI);            /* level, fixed, unmasked */
    rc = hvm_set_param(HVM_PARAM_CALLBACK_IRQ, CALLBACK_GSI);               /* type 0: a GSI */
    check(rc == 0, "HVM_PARAM_CALLBACK_IRQ = GSI %d (%ld)", CALLBACK_GSI, rc);
}

int xen_start_vcpu(int slot) {
    u32 vcpu = cpus[slot].acpi_uid;
    long rc = HYPERVISOR3(vcpu_op, VCPUOP_is_up, vcpu, 0);
    check(rc == 0, "vCPU %u is down before VCPUOP_up (is_up %ld)", vcpu, rc);
    static struct vcpu_hvm_context ctx;
    memset(&ctx, 0, sizeof(ctx));
#ifdef __x86_64__
    ctx.mode = 1;                                          /* VCPU_HVM_MODE_64B: Xen makes CS 64-bit flat */
    ctx.cpu_regs.x86_64.rip = (ulong)ap_entry64_xen;
    ctx.cpu_regs.x86_64.rsp = (ulong)(xen_boot_stack + sizeof(xen_boot_stack));
    ctx.cpu_regs.x86_64.rflags = 0x2;
    ctx.cpu_regs.x86_64.cr0 = 0x80010011;                  /* PG WP ET PE */
    ctx.cpu_regs.x86_64.cr3 = read_cr3();                  /* the BSP's page tables */
    ctx.cpu_regs.x86_64.cr4 = read_cr4();
    ctx.cpu_regs.x86_64.efer = 0x100;                      /* LME; Xen adds LMA */
    const char *mode = "64B";
#else
    struct vcpu_hvm_x86_32 *r = &ctx.cpu_regs.x86_32;      /* VCPU_HVM_MODE_32B */
    r->eip = (ulong)ap_entry32;
    r->esp = (ulong)(xen_boot_stack + sizeof(xen_boot_stack));
    r->eflags = 0x2;
    r->cr0 = 0x11;                                         /* ET PE: flat protected mode, no paging */
    r->cs_limit = r->ds_limit = r->ss_limit = r->es_limit = 0xFFFFFFFF;
    /* _ar: type, s, dpl, p in bits 0-7; avl, l, db, g in bits 8-11 (hvm_vcpu.h) */
    r->cs_ar = 0xC9B;                                      /* code, read, accessed; 32-bit, 4 KiB granules */
    r->ds_ar = r->ss_ar = r->es_ar = 0xC93;                /* data, write, accessed */
    r->tr_base = (ulong)xen_ap_tss;
    r->tr_limit = 0x67;
    r->tr_ar = 0x8B;                                       /* present 32-bit TSS, busy */
    const char *mode = "32B";
#endif
    rc = HYPERVISOR3(vcpu_op, VCPUOP_initialise, vcpu, &ctx);
    check(rc == 0, "VCPUOP_initialise(vCPU %u, VCPU_HVM_MODE_%s) = %ld", vcpu, mode, rc);
    if (rc)
        return 0;
    rc = HYPERVISOR3(vcpu_op, VCPUOP_up, vcpu, 0);
    check(rc == 0, "VCPUOP_up(vCPU %u) = %ld", vcpu, rc);
    return rc == 0;
}

/* After the AP is up (either way): Xen says it is up and refuses a second
 * VCPUOP_initialise. */
static void check_started(int slot, const char *how) {
    u32 vcpu = cpus[slot].acpi_uid;
    static struct vcpu_hvm_context ctx;
    memset(&ctx, 0, sizeof(ctx));
    ctx.mode = sizeof(ulong) == 8;
    long up = HYPERVISOR3(vcpu_op, VCPUOP_is_up, vcpu, 0);
    long again = HYPERVISOR3(vcpu_op, VCPUOP_initialise, vcpu, &ctx);
    check(up == 1 && again == -EEXIST, "vCPU %u started by %s: is_up %ld, VCPUOP_initialise again %ld (-EEXIST)",
          vcpu, how, up, again);
}

void xen_sipi_started(int slot) { check_started(slot, "INIT-SIPI-SIPI"); }

static void bind_ipi_here(int slot, ulong unused) {
    struct evtchn_bind_ipi b = { vcpu_of(slot), 0 };
    xen_rc[slot] = EVTCHN(EVTCHNOP_bind_ipi, &b);
    cpus[slot].result = b.port;
}

static void set_vector_here(int slot, ulong vector) {
    struct upcall_vector uv = { vcpu_of(slot), (u8)vector };
    xen_rc[slot] = HYPERVISOR(hvm_op, HVMOP_set_evtchn_upcall_vector, &uv);
}

static long send(u32 port) { return EVTCHN(EVTCHNOP_send, &port); }

static int bit(volatile ulong *words, u32 n) { return (int)(words[n / BITS] >> (n % BITS) & 1); }

static void vcpu1_events(int s) {
    u32 v = vcpu_of(s);
    int ok = run_on(1u << s, bind_ipi_here, 0, 2000);
    u32 port = cpus[s].result;
    check(ok && xen_rc[s] == 0 && port < NPORTS, "vCPU %u bound IPI port %u to itself (%ld)", v, port, xen_rc[s]);
    if (!ok || xen_rc[s] || port >= NPORTS)
        return;
    port_owner[port] = (u32)s + 1;
    volatile struct vcpu_info *vi = vinfo[s];
    if (!vi || !vinfo[0]) {
        skip("per-vCPU events: no vcpu_info for vCPU 0 or %u", v);
        return;
    }
    u32 gsis = cpus[0].hits[HIT_GSI];
    long rc = send(port);
    udelay(2000);                                          /* time for a wrong GSI */
    check(rc == 0 && vi->evtchn_upcall_pending == 1 && bit(&vi->evtchn_pending_sel, port / BITS) && bit(pending, port),
          "vCPU 0 sent on it: vCPU %u's upcall_pending %u, pending_sel %#lx, port pending %d", v,
          vi->evtchn_upcall_pending, vi->evtchn_pending_sel, bit(pending, port));
    check(cpus[0].hits[HIT_GSI] == gsis && !vinfo[0]->evtchn_upcall_pending && !cpus[s].hits[HIT_UPCALL],
          "no callback GSI at vCPU 0 (%u) and no upcall on vCPU %u: the GSI is for vCPU 0's events only",
          cpus[0].hits[HIT_GSI] - gsis, v);

    ok = run_on(1u << s, set_vector_here, VEC_UPCALL, 2000);
    check(ok && xen_rc[s] == 0, "vCPU %u: HVMOP_set_evtchn_upcall_vector(%#x) = %ld", v, VEC_UPCALL, xen_rc[s]);
    wait_nonzero(&events[port], 1000);
    check(events[port] == 1 && !vi->evtchn_upcall_pending, "setting the vector delivered the pending event to "
          "vCPU %u's handler (%u events, %u upcalls)", v, events[port], cpus[s].hits[HIT_UPCALL]);
    rc = send(port);
    wait_at_least(&events[port], 2, 1000);
    udelay(1000);
    check(rc == 0 && events[port] == 2 && cpus[s].hits[HIT_UPCALL] == 2,
          "a second send reached vCPU %u on vector %#x (%u events, %u upcalls)", v, VEC_UPCALL, events[port],
          cpus[s].hits[HIT_UPCALL]);
    check(cpus[0].hits[HIT_GSI] == gsis, "still no GSI at vCPU 0 (%u)", cpus[0].hits[HIT_GSI] - gsis);
}

static void vcpu0_events(void) {
    u32 upcalls1 = ncpus > 1 ? cpus[1].hits[HIT_UPCALL] : 0, gsis = cpus[0].hits[HIT_GSI];
    struct evtchn_bind_ipi b = { vcpu_of(0), 0 };
    long rc = EVTCHN(EVTCHNOP_bind_ipi, &b);
    check(rc == 0 && b.port < NPORTS, "vCPU 0 bound IPI port %u (%ld)", b.port, rc);
    if (rc || b.port >= NPORTS)
        return;
    port_owner[b.port] = 1;
    rc = send(b.port);
    wait_nonzero(&events[b.port], 1000);
    udelay(1000);                                          /* a level line left high would come again */
    check(rc == 0 && events[b.port] == 1 && cpus[0].hits[HIT_GSI] == gsis + 1,
          "an event for vCPU 0 came through GSI %d on vector %#x, once (%u)", CALLBACK_GSI, VEC_GSI,
          cpus[0].hits[HIT_GSI] - gsis);
    if (ncpus > 1)
        check(cpus[1].hits[HIT_UPCALL] == upcalls1, "and nothing on vCPU 1's vector");
}

static void send_later(int slot, ulong port) {
    udelay(3000);                                          /* the BSP is asleep in its poll by then */
    xen_rc[slot] = send((u32)port);
}

static void poll_masked_port(void) {
    struct evtchn_bind_ipi b = { vcpu_of(0), 0 };
    long rc = EVTCHN(EVTCHNOP_bind_ipi, &b);
    check(rc == 0 && b.port < NPORTS, "vCPU 0 bound a second IPI port %u (%ld)", b.port, rc);
    if (rc || b.port >= NPORTS)
        return;
    u32 port = b.port;
    set_bit(&evmask[port / BITS], port % BITS);
    u32 gsis = cpus[0].hits[HIT_GSI];
    u32 seq = run_on_start(2, send_later, port);
    struct sched_poll p = { &port, 1, 0 };                 /* timeout 0: none */
    rc = HYPERVISOR(sched_op, SCHEDOP_poll, &p);
    int was_pending = bit(pending, port);
    int done = run_on_finish(2, seq, 2000);
    check(rc == 0 && was_pending && done && xen_rc[1] == 0,
          "SCHEDOP_poll (no timeout) on masked port %u ended when vCPU 1 sent on it (%ld, pending %d, send %ld)",
          port, rc, was_pending, xen_rc[1]);
    check(cpus[0].hits[HIT_GSI] == gsis && !vinfo[0]->evtchn_upcall_pending,
          "the masked port raised no upcall (%u GSIs, upcall_pending %u)", cpus[0].hits[HIT_GSI] - gsis,
          vinfo[0]->evtchn_upcall_pending);
    clear_bit(&pending[port / BITS], port % BITS);
    clear_bit(&evmask[port / BITS], port % BITS);
}

void xen_events(void) {
    u32 aps = ap_mask();
    for (int s = 1; s < ncpus; s++)
        if (aps >> s & 1)
            check(cpus[s].vcpu_id == cpus[s].acpi_uid, "CPU %d is vCPU %u (CPUID leaf 4; MADT processor UID %u)", s,
                  cpus[s].vcpu_id, cpus[s].acpi_uid);
    if (ncpus >= 3 && (aps >> (ncpus - 1) & 1))
        check_started(ncpus - 1, "VCPUOP_up");
    else
        skip("VCPUOP_initialise + VCPUOP_up: needs a third CPU (%d)", ncpus);
    if (aps & 2)
        vcpu1_events(1);
    else
        skip("per-vCPU events: no vCPU 1");
    vcpu0_events();
    if ((aps & 2) && vinfo[0])
        poll_masked_port();
    else
        skip("SCHEDOP_poll woken from another vCPU: no vCPU 1");
}
