/* What smp.c (the plain x86 part) and smpxen.c (the Xen part) share. */
#ifndef XENICORN_SMP_H
#define XENICORN_SMP_H
#include "../lib/kernel.h"

#define MAX_CPUS 8                  /* entry.S MAX_APS + 1; also the flat logical model's 8 bits */
#define TRAMPOLINE 0x8000           /* SIPI vector 0x08: the AP starts at CS:IP 0800:0000 */

/* Local APIC registers, offsets from 0xFEE00000 (Intel SDM vol. 3, "Local
 * APIC Register Address Map") */
#define LAPIC 0xFEE00000UL
#define APIC_ID         0x020       /* bits 31:24 */
#define APIC_TPR        0x080
#define APIC_EOI        0x0B0
#define APIC_LDR        0x0D0       /* logical ID, bits 31:24 */
#define APIC_DFR        0x0E0       /* model, bits 31:28: 1111b flat, 0000b cluster */
#define APIC_SVR        0x0F0       /* bit 8: software enable; bits 7:0 spurious vector */
#define APIC_ICR_LO     0x300
#define APIC_ICR_HI     0x310       /* destination, bits 31:24 */
#define APIC_LVT_TIMER  0x320
#define APIC_TIMER_INIT 0x380
#define APIC_TIMER_CUR  0x390
#define APIC_TIMER_DIV  0x3E0

/* ICR low word ("Interrupt Command Register (ICR)") */
#define ICR_FIXED        (0 << 8)
#define ICR_INIT         (5 << 8)
#define ICR_STARTUP      (6 << 8)
#define ICR_LOGICAL      (1 << 11)  /* destination mode */
#define ICR_BUSY         (1 << 12)  /* delivery status: send pending */
#define ICR_ASSERT       (1 << 14)  /* level */
#define ICR_LEVEL        (1 << 15)  /* trigger mode */
#define ICR_ALL_BUT_SELF (3 << 18)  /* destination shorthand */

/* Vectors */
#define VEC_KICK     0x30           /* "look at the command word" (smp.c run_on) */
#define VEC_TIMER    0x3E           /* LAPIC timer: delays and timeouts */
#define VEC_PING     0x40           /* BSP -> AP */
#define VEC_PONG     0x41           /* AP -> BSP */
#define VEC_BCAST    0x42           /* all excluding self */
#define VEC_LOGICAL  0x43           /* logical destination */
#define VEC_GSI      0x50           /* the Xen callback GSI through the IOAPIC */
#define VEC_UPCALL   0xF4           /* the per-vCPU Xen upcall vector */
#define VEC_SPURIOUS 0xFF

enum { HIT_PING, HIT_BCAST, HIT_LOGICAL, HIT_KICK, HIT_UPCALL, HIT_GSI, HIT_SPURIOUS, HIT_KINDS };

/* One per CPU, the BSP in slot 0, then the MADT's other enabled entries. A
 * slot's volatile fields are written by its own CPU and read by the BSP. */
struct cpu {
    u32 apic_id;                    /* from the MADT */
    u32 acpi_uid;                   /* MADT processor UID: Xen's vCPU id (Linux uses it so too) */
    volatile u32 arrived;           /* arrival order, from 1; 0 = never arrived */
    volatile u32 cpuid_apic;        /* CPUID.1:EBX[31:24], as the CPU itself read it */
    volatile u32 lapic_id;          /* its LAPIC ID register, bits 31:24 */
    volatile u32 vcpu_id;           /* Xen: CPUID leaf base+4 EBX, or ~0 */
    volatile u32 done;              /* the last command sequence number it finished */
    volatile u32 result;            /* a command's answer */
    volatile u32 timer_fired;
    volatile u32 hits[HIT_KINDS];   /* interrupts taken, by kind */
};

extern struct cpu cpus[MAX_CPUS];
extern int ncpus;
extern int on_xen;
extern u32 ioapic_base;             /* from the MADT (0xFEC00000 on a PC) */

static inline u32 apic_read(u32 reg) { return *(volatile u32 *)(LAPIC + reg); }
static inline void apic_write(u32 reg, u32 v) { *(volatile u32 *)(LAPIC + reg) = v; }
static inline void pause(void) { __asm__ volatile("pause" ::: "memory"); }
static inline void barrier(void) { __asm__ volatile("" ::: "memory"); }

typedef void (*ap_fn)(int slot, ulong arg);

int my_slot(void);                  /* this CPU's slot, by its LAPIC ID; -1 if not in the table */
void skip(const char *fmt, ...);    /* "SKIP ..." */
int send_ipi(u32 dest, u32 icr);    /* 0 if the ICR stayed busy */
void udelay(u32 us);
int wait_nonzero(volatile u32 *p, u32 ms);
int wait_at_least(volatile u32 *p, u32 want, u32 ms);
u32 ap_mask(void);                  /* slots of the APs that arrived */
int run_on(u32 mask, ap_fn fn, ulong arg, u32 ms);   /* 1 if every slot in mask finished */
u32 run_on_start(u32 mask, ap_fn fn, ulong arg);    /* the same in two halves: start, ... */
int run_on_finish(u32 mask, u32 seq, u32 ms);       /* ... then wait for the start's sequence number */

/* madt.c */
void read_madt(void);               /* fills cpus[] (the BSP in slot 0) and ncpus; "cpus: N" */

/* smpxen.c */
void xen_early(void);               /* before the APs start: hypercall page, shared_info, vcpu_info */
void xen_identify(int slot);        /* on each CPU: its vCPU id from CPUID */
int xen_start_vcpu(int slot);       /* VCPUOP_initialise + VCPUOP_up; 1 if the calls succeeded */
void xen_sipi_started(int slot);    /* checks on a vCPU that INIT-SIPI-SIPI started */
void xen_events(void);              /* the per-vCPU event delivery tests */
#endif
