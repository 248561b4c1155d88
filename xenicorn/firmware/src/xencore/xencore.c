/* xencore32 / xencore64: the Xen core as a guest sees it.
 *
 * Finds Xen through CPUID, asks for the hypercall MSR and installs the
 * hypercall page only after unrelated work (CPUID and WRMSR far apart, as
 * Linux does), then exercises xen_version, console_io, memory_op, hvm_op,
 * vcpu_op and sched_op, each with good and bad arguments, a hypercall from
 * CPL3, and the PV clock. Every check prints "ok" or "FAIL"; the last line
 * is the XTF-style verdict, and the kernel powers off with SCHEDOP_shutdown. */
#include "../lib/kernel.h"
#include "../lib/xen.h"


static u8 shared_page[4096] __attribute__((aligned(4096)));
static u8 vcpu_page[4096] __attribute__((aligned(4096)));
static u8 balloon_page[4096] __attribute__((aligned(4096)));
static u8 buf[1024];
#ifdef __x86_64__
#define BAD_PTR 0xC0000000UL              /* mapped by our page tables, but not RAM */
#define WIDTH 64
#else
#define BAD_PTR 0xC0000000UL              /* paging off: simply not RAM */
#define WIDTH 32
#endif
#define PAGE_PFN(p) ((ulong)(p) >> 12)

struct xen_feature_info { u32 submap_idx, submap; };
struct xen_add_to_physmap { u16 domid, size; u32 space; ulong idx, gpfn; };
struct xen_memory_map { u32 nr_entries; void *buffer; };
struct xen_memory_reservation { ulong *extent_start; ulong nr_extents; u32 extent_order, mem_flags; u16 domid; };
struct upcall_vector { u32 vcpu; u8 vector; };
struct vcpu_register_vcpu_info { u64 mfn; u32 offset, rsvd; };
struct sched_shutdown { u32 reason; };
struct sched_remote_shutdown { u16 domain_id; u32 reason; };

static volatile long user_result = 12345;

static void discover(void) {
    u32 base = xen_cpuid_base(), a, b, c, d;
    check(base == XEN_CPUID_BASE, "Xen signature at CPUID %#x", base);
    cpuid(base, 0, &a, &b, &c, &d);
    check(a >= base + 4, "highest Xen leaf %#x", a);
    cpuid(base + 1, 0, &a, &b, &c, &d);
    printf("Xen %u.%u found\n", a >> 16, a & 0xFFFF);
    u32 version = a;
    cpuid(base + 4, 0, &a, &b, &c, &d);
    check((a & (1 << 3)) && (a & (1 << 4)) && b == 0 && c != 0, "HVM leaf: vcpu id %u, domid %u", b, c);
    cpuid(base + 2, 0, &a, &b, &c, &d);
    check(a == 1 && b == 0x40000000, "one hypercall page, MSR %#x", b);
    /* unrelated work between the CPUID query and the MSR write */
    u32 x = 1;
    for (int i = 0; i < 200000; i++)
        x = x * 1103515245 + 12345;
    printf("busy work done (%#x)\n", x);
    xen_install_hypercall_page();
    check(hypercall_page[0] == 0xB8 && hypercall_page[17 * 32 + 1] == 17, "hypercall page filled");
    EXPECT(HYPERVISOR(xen_version, 0, 0), version, "XENVER_version");
}

static void test_version_and_console(void) {
    char extra[16];
    EXPECT(HYPERVISOR(xen_version, 1, extra), 0, "XENVER_extraversion");
    printf("extraversion \"%s\"\n", extra);
    static char caps[1024];
    EXPECT(HYPERVISOR(xen_version, 3, caps), 0, "XENVER_capabilities");
    printf("capabilities \"%s\"\n", caps);
    struct xen_feature_info fi = { 0, 0 };
    EXPECT(HYPERVISOR(xen_version, 6, &fi), 0, "XENVER_get_features");
    check(fi.submap & (1 << 2), "feature auto_translated_physmap (%#x)", fi.submap);
    EXPECT(HYPERVISOR(xen_version, 7, 0), 4096, "XENVER_pagesize");
    EXPECT(HYPERVISOR(xen_version, 9, buf), -EPERM, "XENVER_commandline (privileged)");
    EXPECT(HYPERVISOR(xen_version, 1, BAD_PTR), -EFAULT, "XENVER_extraversion to a bad pointer");
    EXPECT(HYPERVISOR(xen_version, 77, buf), -ENOSYS, "unknown xen_version cmd");
    static const char msg[] = "hello through console_io\n";
    EXPECT(HYPERVISOR3(console_io, 0, sizeof(msg) - 1, msg), 0, "CONSOLEIO_write");
    EXPECT(HYPERVISOR3(console_io, 1, 0x80000000UL, buf), -E2BIG, "CONSOLEIO_read of 2 GiB");
    EXPECT(HYPERVISOR3(console_io, 0, 8, BAD_PTR), -EFAULT, "CONSOLEIO_write from a bad pointer");
    /* the page has stubs for 0..127 only: call 200 with an inline VMCALL,
     * which Xen accepts anywhere (Linux 6.x calls inline too) */
    long r;
    __asm__ volatile("vmcall" : "=a"(r) : "a"(200UL) : "memory");
    EXPECT(r, -ENOSYS, "inline VMCALL of hypercall 200");
    __asm__ volatile("vmcall" : "=a"(r) : "a"((ulong)__HYPERVISOR_xen_version), "b"(0UL), "D"(0UL) : "memory");
    check(r == 0x40011, "inline VMCALL of xen_version = %#lx", r);
}

static volatile struct vcpu_time_info *time_info(u8 *vcpu_info) {
    return (volatile struct vcpu_time_info *)(vcpu_info + 0x20);
}

/* populate_physmap where the guest has no RAM: gfn 0xfffff, the last page below 4 GiB
 * (XSA-186's test puts its code there). Xen allocates a page for any gfn, within
 * max_pages; over a populated gfn it maps a fresh page (the old one stays counted). */
static void test_populate_hole(long cur) {
    u16 self = DOMID_SELF;
    ulong gfn = 0xFFFFF;
    volatile u32 *p = (volatile u32 *)(gfn << 12);
    struct xen_memory_reservation r = { &gfn, 1, 0, 0, DOMID_SELF };
    check(*p == 0xFFFFFFFFu, "gfn 0xfffff is a hole: reads float high (%#x)", *p);
    EXPECT(HYPERVISOR(memory_op, 6, &r), 1, "populate_physmap(0xfffff)");
    EXPECT(HYPERVISOR(memory_op, 3, &self), cur + 1, "current_reservation counts the new page");
    check(*p == 0, "the new page reads zero");
    *p = 0x12345678;
    check(*p == 0x12345678, "the new page holds data");
    EXPECT(HYPERVISOR(memory_op, 6, &r), 1, "populate_physmap over a populated gfn");
    check(*p == 0, "a fresh page replaced it");
    EXPECT(HYPERVISOR(memory_op, 3, &self), cur + 2, "the replaced page is still counted");
    *p = 0xCAFE;
    EXPECT(HYPERVISOR(memory_op, 1, &r), 1, "decrease_reservation(0xfffff)");
    EXPECT(HYPERVISOR(memory_op, 3, &self), cur + 1, "current_reservation after giving it back");
    check(*p == 0xFFFFFFFFu, "gfn 0xfffff is a hole again (%#x)", *p);
    gfn = 0x200000;                         /* 8 GiB: 512 pages, more than max_pages leaves */
    r.extent_order = 9;
    EXPECT(HYPERVISOR(memory_op, 6, &r), 0, "populate_physmap of 2 MiB over max_pages: 0 extents");
    r.extent_order = 0;
    EXPECT(HYPERVISOR(memory_op, 3, &self), cur + 1, "a refused allocation takes nothing");
#ifdef __x86_64__
    gfn = 1UL << 36;                        /* guest-physical 2^48: past the p2m's width */
    EXPECT(HYPERVISOR(memory_op, 6, &r), 0, "populate_physmap past 48 physical bits: 0 extents");
    EXPECT(HYPERVISOR(memory_op, 3, &self), cur + 2, "Xen keeps the page it allocated before the p2m refused");
#endif
}

static void test_memory(void) {
    struct xen_add_to_physmap xatp = { DOMID_SELF, 0, 0, 0, PAGE_PFN(shared_page) };
    EXPECT(HYPERVISOR(memory_op, 7, &xatp), 0, "add_to_physmap(shared_info)");
#ifdef __x86_64__
    u32 *wc = (u32 *)(shared_page + 0xC00);
#else
    u32 *wc = (u32 *)(shared_page + 0x900);
#endif
    check(wc[0] && !(wc[0] & 1) && wc[1] > 1700000000u, "wallclock: version %u, %u s", wc[0], wc[1]);
    volatile struct vcpu_time_info *t = time_info(shared_page);
    check(t->version && !(t->version & 1) && t->tsc_to_system_mul, "PV clock published (mul %#x shift %d)",
          t->tsc_to_system_mul, t->tsc_shift);
    u64 t1 = pvclock_read(t);
    for (volatile int i = 0; i < 100000; i++) ;
    u64 t2 = pvclock_read(t);
    check(t2 > t1, "PV clock advances (%llu -> %llu ns)", t1, t2);
    xatp.idx = 1;
    EXPECT(HYPERVISOR(memory_op, 7, &xatp), -EINVAL, "shared_info idx 1");
    xatp.idx = 0; xatp.space = 2;
    EXPECT(HYPERVISOR(memory_op, 7, &xatp), -EOPNOTSUPP, "XENMAPSPACE_gmfn");
    xatp.space = 0; xatp.domid = 9;
    EXPECT(HYPERVISOR(memory_op, 7, &xatp), -ESRCH, "another domain");

    static u8 e820[20 * 16];
    struct xen_memory_map map = { 16, e820 };
    EXPECT(HYPERVISOR(memory_op, 9, &map), 0, "XENMEM_memory_map");
    check(map.nr_entries == start_info->memmap_entries, "%u E820 entries, as in start_info", map.nr_entries);
    u16 self = DOMID_SELF;
    long cur = HYPERVISOR(memory_op, 3, &self), max = HYPERVISOR(memory_op, 4, &self);
    check(cur > 0 && max == cur + 256, "reservation %ld of %ld pages (libxl's 1 MiB slack above)", cur, max);

    ulong pfn = PAGE_PFN(balloon_page);
    struct xen_memory_reservation r = { &pfn, 1, 0, 0, DOMID_SELF };
    EXPECT(HYPERVISOR(memory_op, 1, &r), 1, "decrease_reservation (balloon out one page)");
    EXPECT(HYPERVISOR(memory_op, 3, &self), cur - 1, "current_reservation after ballooning");
    EXPECT(HYPERVISOR(memory_op, 6, &r), 1, "populate_physmap (give it back)");
    test_populate_hole(cur);
    r.extent_start = (ulong *)BAD_PTR;
    EXPECT(HYPERVISOR(memory_op, 1, &r), -EFAULT, "decrease_reservation with a bad extent list");
    EXPECT(HYPERVISOR(memory_op, 99, &r), -ENOSYS, "unknown memory_op");
}

static void test_hvm(void) {
    struct xen_hvm_param p = { DOMID_SELF, 0, (2ULL << 56) | 0xF3 };
    EXPECT(HYPERVISOR(hvm_op, 0, &p), 0, "set CALLBACK_IRQ = vector 0xf3");
    p.value = 0;
    EXPECT(HYPERVISOR(hvm_op, 1, &p), 0, "get CALLBACK_IRQ");
    check(p.value == ((2ULL << 56) | 0xF3), "CALLBACK_IRQ reads back %#llx", p.value);
    p.index = 1; p.value = 0x1234;
    EXPECT(HYPERVISOR(hvm_op, 0, &p), -EPERM, "set STORE_PFN (the toolstack's)");
    p.index = 10; p.value = 7;
    EXPECT(HYPERVISOR(hvm_op, 0, &p), -EINVAL, "TIMER_MODE 7");
    p.index = 39;
    EXPECT(HYPERVISOR(hvm_op, 1, &p), -EINVAL, "param 39");
    p.index = 0; p.domid = 5;
    EXPECT(HYPERVISOR(hvm_op, 1, &p), -ESRCH, "param of another domain");
    u64 now[2];
    EXPECT(HYPERVISOR(hvm_op, 10, &now[0]), 0, "HVMOP_get_time");
    EXPECT(HYPERVISOR(hvm_op, 10, &now[1]), 0, "HVMOP_get_time again");
    check(now[1] >= now[0] && now[0] > 0, "Xen time advances (%llu -> %llu)", now[0], now[1]);
    struct upcall_vector uv = { 0, 0x0F };
    EXPECT(HYPERVISOR(hvm_op, 23, &uv), -EINVAL, "upcall vector 0x0f");
    uv.vector = 0xF2; uv.vcpu = 3;
    EXPECT(HYPERVISOR(hvm_op, 23, &uv), -ENOENT, "upcall vector for vCPU 3");
    uv.vcpu = 0;
    EXPECT(HYPERVISOR(hvm_op, 23, &uv), 0, "upcall vector 0xf2 for vCPU 0");
}

static void test_vcpu(void) {
    shared_page[1] = 1;                                   /* evtchn_upcall_mask in shared_info */
    struct vcpu_register_vcpu_info vi = { PAGE_PFN(vcpu_page), 0x80, 0 };
    EXPECT(HYPERVISOR3(vcpu_op, 10, 0, &vi), 0, "register_vcpu_info");
    check(vcpu_page[0x81] == 1, "vcpu_info content moved with it");
    check(time_info(vcpu_page + 0x80)->tsc_to_system_mul != 0, "PV clock in the new vcpu_info");
    EXPECT(HYPERVISOR3(vcpu_op, 10, 0, &vi), -EINVAL, "register_vcpu_info twice");
    EXPECT(HYPERVISOR3(vcpu_op, 10, 7, &vi), -ENOENT, "register_vcpu_info for vCPU 7");
    u64 period = 100000;
    EXPECT(HYPERVISOR3(vcpu_op, 6, 0, &period), -EINVAL, "periodic timer of 100 us");
    period = 10000000;
    EXPECT(HYPERVISOR3(vcpu_op, 6, 0, &period), 0, "periodic timer of 10 ms");
    EXPECT(HYPERVISOR3(vcpu_op, 7, 0, 0), 0, "stop periodic timer");
    EXPECT(HYPERVISOR3(vcpu_op, 3, 0, 0), 1, "VCPUOP_is_up(0)");
    static u8 rs[48];
    EXPECT(HYPERVISOR3(vcpu_op, 4, 0, rs), 0, "get_runstate_info");
    check(*(u32 *)rs == 0, "vCPU 0 is running");
}

struct sched_poll { u32 *ports; u32 nr_ports; u64 timeout; };
struct sched_watchdog { u32 id, timeout; };

static void test_sched(void) {
    EXPECT(HYPERVISOR(sched_op, SCHEDOP_yield, 0), 0, "SCHEDOP_yield");
    u64 t0 = 0, t1 = 0;
    HYPERVISOR(hvm_op, 10, &t0);
    struct sched_poll p = { 0, 0, t0 + 2000000 };
    EXPECT(HYPERVISOR(sched_op, 3, &p), 0, "SCHEDOP_poll with a 2 ms timeout");
    HYPERVISOR(hvm_op, 10, &t1);
    check(t1 - t0 >= 2000000, "poll slept %llu ns", t1 - t0);
    p.nr_ports = 200;
    EXPECT(HYPERVISOR(sched_op, 3, &p), -EINVAL, "SCHEDOP_poll of 200 ports");
    struct sched_watchdog w = { 0, 60 };
    EXPECT(HYPERVISOR(sched_op, 6, &w), 1, "SCHEDOP_watchdog create");
    w.id = 1; w.timeout = 0;
    EXPECT(HYPERVISOR(sched_op, 6, &w), 0, "SCHEDOP_watchdog stop");
    EXPECT(HYPERVISOR(sched_op, 6, &w), -EINVAL, "SCHEDOP_watchdog stop again");
    u64 deadline = t1 + 10000000000ULL;
    EXPECT(xen_hypercall(15, (ulong)deadline, (ulong)(deadline >> 32), 0, 0, 0), 0, "set_timer_op(+10 s)");
    EXPECT(xen_hypercall(15, 0, 0, 0, 0, 0), 0, "set_timer_op(0): stop");
    struct sched_remote_shutdown rs = { 0, 0 };
    EXPECT(HYPERVISOR(sched_op, SCHEDOP_remote_shutdown, &rs), -EPERM, "remote_shutdown of dom0");
    struct sched_shutdown s = { 9 };
    EXPECT(HYPERVISOR(sched_op, SCHEDOP_shutdown, &s), -EINVAL, "shutdown reason 9");
}

static void user_main(void) {
    user_result = xen_hypercall(__HYPERVISOR_xen_version, 0, 0, 0, 0, 0);
}

static void test_user_mode(void) {
    run_user(user_main);
    check(user_result == -EPERM, "hypercall from CPL3 = %ld (expected -EPERM)", user_result);
}

void kmain(void) {
    printf("xencore%d: the Xen core from the guest's side\n", WIDTH);
    discover();
    test_version_and_console();
    test_memory();
    test_hvm();
    test_vcpu();
    test_sched();
    test_user_mode();
    test_result();                                        /* powers off with SCHEDOP_shutdown */
}
