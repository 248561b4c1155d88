/* xenabi32 / xenabi64: an XTF-style guest: its two consoles, and what Xen
 * refuses a domU.
 *
 *  1. Output as XTF prints it under Xen: every line through console_io
 *     (Xen's log, `xl dmesg`, where Xen prefixes it "(d1) ") and through the
 *     PV console ring (the guest's console, `xl console`). Nothing goes to
 *     port 0xE9, so each line is on the guest's console exactly once.
 *  2. console_io's own rules, through console_io only: a line written in
 *     three pieces is one log line; non-printable bytes are dropped.
 *  3. The hypercalls a domU may not use, with the answers Xen gives an HVM
 *     guest (docs/xen-abi.md cites the Xen function of each): absent from
 *     the HVM table (-ENOSYS), the version check (-EACCES), XSM's dummy
 *     policy (-EPERM), and the argument checks that come before it.
 * The interface versions are those of Xen 4.17, the version xenicorn
 * reports by default. */
#include "../lib/kernel.h"
#include "../lib/xen.h"

#define __HYPERVISOR_event_channel_op 32
#define EVTCHNOP_send 4
#define HVM_PARAM_CONSOLE_PFN 17
#define HVM_PARAM_CONSOLE_EVTCHN 18
#define EACCES 13
#define ENODATA 61
#define DOMCTL_V 0x15            /* XEN_DOMCTL_INTERFACE_VERSION of 4.17 */
#define SYSCTL_V 0x15            /* XEN_SYSCTL_INTERFACE_VERSION of 4.17 */
#define XENPF_V 0x03000001
#define DOMID_INVALID 0x7FF4
#ifdef __x86_64__
#define BAD_PTR 0xC0000000UL     /* mapped by our page tables, but not RAM */
#else
#define BAD_PTR 0xC0000000UL     /* paging off: simply not RAM */
#endif

struct cons_ring {
    char in[1024], out[2048];
    volatile u32 in_cons, in_prod, out_cons, out_prod;
};
/* platform_op and sysctl: cmd, interface_version, a 128-byte union */
struct op_hdr { u32 cmd, version; u8 u[128]; } __attribute__((aligned(8)));
/* domctl: cmd, interface_version, domain, _pad[3], a 128-byte union */
struct domctl { u32 cmd, version; u16 domain, pad[3]; u64 u[16]; };
struct dm_op_buf { ulong h; ulong size; };

static struct cons_ring *cons;
static u32 con_port;
static char line[256];
static int fails;

static u64 get_param(u32 index) {
    struct xen_hvm_param p = { DOMID_SELF, index, 0 };
    long r = HYPERVISOR(hvm_op, 1, &p);
    return r ? (u64)-1 : p.value;
}

static void pv_write(const char *s, ulong n) {
    u32 prod = cons->out_prod;
    for (ulong i = 0; i < n; i++) {
        while (prod - cons->out_cons >= sizeof(cons->out)) {    /* full: let xenconsoled drain it */
            cons->out_prod = prod;
            u32 p = con_port;
            xen_hypercall(__HYPERVISOR_event_channel_op, EVTCHNOP_send, (ulong)&p, 0, 0, 0);
        }
        cons->out[prod++ & (sizeof(cons->out) - 1)] = s[i];
    }
    __asm__ volatile("" ::: "memory");
    cons->out_prod = prod;
    u32 p = con_port;
    xen_hypercall(__HYPERVISOR_event_channel_op, EVTCHNOP_send, (ulong)&p, 0, 0, 0);
}

/* XTF's printk under Xen: the same text to both consoles. */
static void say(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof(line), fmt, ap);
    va_end(ap);
    if (n >= (int)sizeof(line))
        n = sizeof(line) - 1;
    HYPERVISOR3(console_io, 0, n, line);
    pv_write(line, n);
}

static void expect(long got, long want, const char *what) {
    say("%s %s = %ld (expected %ld)\n", got == want ? "ok" : "FAIL", what, got, want);
    if (got != want)
        fails++;
}

static long hcall(ulong nr, ulong a1, ulong a2, ulong a3) { return xen_hypercall(nr, a1, a2, a3, 0, 0); }

static void test_console_io_rules(void) {
    static const char p1[] = "one line ", p2[] = "in three ", p3[] = "pieces\n";
    expect(HYPERVISOR3(console_io, 0, sizeof(p1) - 1, p1) | HYPERVISOR3(console_io, 0, sizeof(p2) - 1, p2) |
           HYPERVISOR3(console_io, 0, sizeof(p3) - 1, p3), 0, "console_io in three pieces");
    static const char ctl[] = "bell\a escape\033[0m cr\r end\n";
    expect(HYPERVISOR3(console_io, 0, sizeof(ctl) - 1, ctl), 0, "console_io with control characters");
    expect(HYPERVISOR3(console_io, 0, 8, BAD_PTR), -EFAULT, "console_io from a bad pointer");
    expect(HYPERVISOR3(console_io, 1, 0x80000000UL, line), -E2BIG, "CONSOLEIO_read of 2 GiB");
}

static void test_absent(void) {
    /* PV-only or not built: no entry in the HVM table */
    static const u32 absent[] = { 0, 1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 14, 16, 19, 22, 23, 25, 27, 28, 30, 31,
                                  37, 38, 39, 43, 48, 50, 55, 56, 63, 64, 127 };
    for (ulong i = 0; i < sizeof(absent) / sizeof(absent[0]); i++) {
        char what[32];
        snprintf(what, sizeof(what), "hypercall %u", absent[i]);
        long r;
        __asm__ volatile("vmcall" : "=a"(r) : "a"((ulong)absent[i]), "b"(0UL), "c"(0UL), "d"(0UL),
                         "S"(0UL), "D"(0UL) : "memory");
        expect(r, -ENOSYS, what);
    }
#ifdef __x86_64__
    long r;
    __asm__ volatile("vmcall" : "=a"(r) : "a"(0x100000000UL | 17), "D"(0UL), "S"(0UL) : "memory");
    expect(r, -ENOSYS, "hypercall 2^32+17 (all of RAX counts)");
#endif
}

static void test_platform_sysctl(void) {
    static struct op_hdr op;
    op.cmd = 48; op.version = XENPF_V;          /* XENPF_settime64 */
    expect(hcall(7, (ulong)&op, 0, 0), -EPERM, "platform_op as a domU");
    op.version = 0;
    expect(hcall(7, (ulong)&op, 0, 0), -EACCES, "platform_op of another interface version");
    expect(hcall(7, BAD_PTR, 0, 0), -EFAULT, "platform_op from a bad pointer");
    op.cmd = 27; op.version = SYSCTL_V;         /* XEN_SYSCTL_livepatch_op */
    expect(hcall(35, (ulong)&op, 0, 0), -EPERM, "sysctl livepatch_op as a domU");
    op.cmd = 1;                                 /* XEN_SYSCTL_readconsole */
    expect(hcall(35, (ulong)&op, 0, 0), -EPERM, "sysctl readconsole as a domU");
    op.version = SYSCTL_V + 1;
    expect(hcall(35, (ulong)&op, 0, 0), -EACCES, "sysctl of another interface version");
}

static void test_domctl(void) {
    static struct domctl d;
    memset(&d, 0, sizeof(d));
    d.cmd = 5; d.version = DOMCTL_V; d.domain = 1;                   /* getdomaininfo, itself */
    expect(hcall(36, (ulong)&d, 0, 0), -EPERM, "domctl getdomaininfo of itself");
    d.domain = 77;
    expect(hcall(36, (ulong)&d, 0, 0), -EPERM, "domctl of a domain that does not exist");
    d.version = DOMCTL_V + 1;
    expect(hcall(36, (ulong)&d, 0, 0), -EACCES, "domctl of another interface version");
    d.version = DOMCTL_V; d.cmd = 37; d.domain = DOMID_INVALID;      /* assign_device */
    expect(hcall(36, (ulong)&d, 0, 0), -ESRCH, "domctl assign_device to DOMID_INVALID");
    d.cmd = 20; d.domain = 1; d.u[0] = ~0ULL; d.u[1] = 2;            /* iomem_permission */
    expect(hcall(36, (ulong)&d, 0, 0), -EINVAL, "domctl iomem_permission of a wrapping range");
    d.u[0] = 0xFEE00; d.u[1] = 1;
    expect(hcall(36, (ulong)&d, 0, 0), -EPERM, "domctl iomem_permission");
    d.cmd = 46; d.u[0] = 1;                                          /* set_target: itself */
    expect(hcall(36, (ulong)&d, 0, 0), -EINVAL, "domctl set_target to itself");
    d.cmd = 56; d.u[0] = 3; d.u[1] = 0;                              /* vm_event_op GET_VERSION */
    expect(hcall(36, (ulong)&d, 0, 0), 0, "domctl vm_event_op GET_VERSION (no XSM check)");
    expect((long)(d.u[1] & 0xFFFFFFFF), 7, "VM_EVENT_INTERFACE_VERSION");
    d.cmd = 90; d.version = 0;                                       /* get_domain_state, stable */
    expect(hcall(36, (ulong)&d, 0, 0), -EPERM, "domctl get_domain_state");
    d.version = DOMCTL_V;
    expect(hcall(36, (ulong)&d, 0, 0), -EACCES, "domctl get_domain_state with a versioned header");
    expect(hcall(36, BAD_PTR, 0, 0), -EFAULT, "domctl from a bad pointer");
    d.cmd = 10; d.domain = 1;                                        /* paging_domctl_cont */
    expect(hcall(49, (ulong)&d, 0, 0), -EPERM, "paging_domctl_cont shadow_op of itself");
    d.domain = 9;
    expect(hcall(49, (ulong)&d, 0, 0), -ESRCH, "paging_domctl_cont of no domain");
    d.cmd = 5;
    expect(hcall(49, (ulong)&d, 0, 0), -EOPNOTSUPP, "paging_domctl_cont of another cmd");
}

static void test_others(void) {
    static struct dm_op_buf bufs[2];
    static u8 dmop[64];
    bufs[0].h = (ulong)dmop; bufs[0].size = sizeof(dmop);
    expect(hcall(41, 1, 0, (ulong)bufs), -ENODATA, "dm_op without buffers");
    expect(hcall(41, 1, 3, (ulong)bufs), -E2BIG, "dm_op with 3 buffers");
    expect(hcall(41, 1, 1, BAD_PTR), -EFAULT, "dm_op with bad buffers");
    expect(hcall(41, 1, 1, (ulong)bufs), -EPERM, "dm_op on itself");
    expect(hcall(41, 0, 1, (ulong)bufs), -EINVAL, "dm_op on dom0 (not HVM)");
    expect(hcall(41, 9, 1, (ulong)bufs), -ESRCH, "dm_op on no domain");
    expect(hcall(40, 0, (ulong)line, 0), -EOPNOTSUPP, "xenpmu_op (an HVM guest has a vLAPIC)");
    expect(hcall(42, 0, 0, 0), -EPERM, "hypfs_op get_version");
}

void kmain(void) {
    xen_install_hypercall_page();
    if (!xen_present) {
        check(0, "xenabi needs Xen");           /* then test_result: FAILURE, on port 0xE9 */
        return;
    }
    cons = (struct cons_ring *)(ulong)(get_param(HVM_PARAM_CONSOLE_PFN) << 12);
    con_port = (u32)get_param(HVM_PARAM_CONSOLE_EVTCHN);
    say("xenabi%d: an XTF-style guest under Xen\n", (int)sizeof(ulong) * 8);
    test_console_io_rules();
    test_absent();
    test_platform_sysctl();
    test_domctl();
    test_others();
    say("Test result: %s\n", fails ? "FAILURE" : "SUCCESS");
    poweroff();
}
