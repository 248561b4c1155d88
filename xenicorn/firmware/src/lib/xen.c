/* Finding Xen and calling it: CPUID leaves, the hypercall page, PV clock. */
#include "xen.h"

u8 hypercall_page[4096] __attribute__((aligned(4096)));
int xen_present;

u32 xen_cpuid_base(void) {
    u32 a, b, c, d;
    for (u32 base = XEN_CPUID_BASE; base < XEN_CPUID_BASE + 0x10000; base += 0x100) {
        cpuid(base, 0, &a, &b, &c, &d);
        if (b == 0x566e6558 && c == 0x65584d4d && d == 0x4d4d566e && a - base >= 2)
            return base;
    }
    return 0;
}

/* CPUID leaf base+2 names the MSR; writing the page's physical address to
 * it makes Xen fill the page with hypercall stubs. */
void xen_install_hypercall_page(void) {
    u32 a, b, c, d, base = xen_cpuid_base();
    if (!base)
        return;
    cpuid(base + 2, 0, &a, &b, &c, &d);
    wrmsr(b, (ulong)hypercall_page);
    xen_present = 1;
}

/* The guest's half of the PV clock: retry while Xen updates the record. */
u64 pvclock_read(volatile struct vcpu_time_info *t) {
    u32 version;
    u64 delta, ns;
    do {
        version = t->version;
        __asm__ volatile("" ::: "memory");
        delta = rdtsc() - t->tsc_timestamp;
        if (t->tsc_shift >= 0)
            delta <<= t->tsc_shift;
        else
            delta >>= -t->tsc_shift;
        /* (delta * mul) >> 32 without a 128-bit multiply */
        u64 lo = (delta & 0xFFFFFFFF) * t->tsc_to_system_mul;
        u64 hi = (delta >> 32) * t->tsc_to_system_mul;
        ns = t->system_time + (hi + (lo >> 32));
        __asm__ volatile("" ::: "memory");
    } while ((version & 1) || version != t->version);
    return ns;
}

long hvm_set_param(u32 index, u64 value) {
    struct xen_hvm_param p = { DOMID_SELF, index, value };
    return HYPERVISOR(hvm_op, 0, &p);        /* HVMOP_set_param */
}
