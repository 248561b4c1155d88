/* Guest side of the Xen ABI used by the test kernels (facts from
 * xen/include/public: xen.h, version.h, sched.h, memory.h, hvm/hvm_op.h,
 * hvm/params.h, vcpu.h, arch-x86/cpuid.h). */
#ifndef XENICORN_XEN_H
#define XENICORN_XEN_H
#include "kernel.h"

#define XEN_CPUID_BASE 0x40000000
#define __HYPERVISOR_memory_op 12
#define __HYPERVISOR_xen_version 17
#define __HYPERVISOR_console_io 18
#define __HYPERVISOR_vcpu_op 24
#define __HYPERVISOR_sched_op 29
#define __HYPERVISOR_hvm_op 34
#define DOMID_SELF 0x7FF0
#define SCHEDOP_yield 0
#define SCHEDOP_shutdown 2
#define SCHEDOP_remote_shutdown 4
#define SHUTDOWN_poweroff 0

#define EPERM 1
#define ENOENT 2
#define ESRCH 3
#define E2BIG 7
#define EFAULT 14
#define EINVAL 22
#define ENOSYS 38
#define ETIME 62
#define EOPNOTSUPP 95

extern u8 hypercall_page[4096];
extern int xen_present;

long xen_hypercall(ulong nr, ulong a1, ulong a2, ulong a3, ulong a4, ulong a5);
#define HYPERVISOR(nr, a1, a2) xen_hypercall(__HYPERVISOR_##nr, (ulong)(a1), (ulong)(a2), 0, 0, 0)
#define HYPERVISOR3(nr, a1, a2, a3) xen_hypercall(__HYPERVISOR_##nr, (ulong)(a1), (ulong)(a2), (ulong)(a3), 0, 0)
#define EVTCHN(op, arg) xen_hypercall(__HYPERVISOR_event_channel_op, op, (ulong)(arg), 0, 0, 0)

u32 xen_cpuid_base(void);                 /* 0 when not on Xen */
void xen_install_hypercall_page(void);

/* HVMOP_set_param / get_param's argument (public/hvm/hvm_op.h) */
struct xen_hvm_param { u16 domid; u32 index; u64 value; };
long hvm_set_param(u32 index, u64 value);   /* HVMOP_set_param on DOMID_SELF: 0 or -errno */

struct vcpu_time_info {
    u32 version, pad0;
    u64 tsc_timestamp, system_time;
    u32 tsc_to_system_mul;
    signed char tsc_shift;
    u8 flags, pad1[2];
};
u64 pvclock_read(volatile struct vcpu_time_info *t);
static inline u64 rdtsc(void) { u32 lo, hi; __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi)); return ((u64)hi << 32) | lo; }
#endif
