/* vm86_32: interrupts and exceptions from virtual-8086 mode (SDM vol. 3 §20.3).
 *
 * The kernel copies a little real-mode code to linear 0x8000 and enters it
 * with an IRET whose EFLAGS has VM=1 (the nine-dword frame: EIP, CS,
 * EFLAGS, ESP, SS, ES, DS, FS, GS). Every event in vm86 goes through the
 * IDT to a ring-0 handler on the TSS's ESP0 stack, which must find:
 *   - the nine dwords (plus the error code) at exactly ESP0 - 36 (- 40),
 *     the vm86 selectors of GS, FS, DS, ES above SS:ESP;
 *   - DS, ES, FS and GS null on entry, VM clear in its own EFLAGS.
 * Cases: (a) a LAPIC timer interrupt while vm86 spins, returned from by
 * IRET into vm86 (which must reload the vm86 segments); (b) INT n with
 * IOPL 0: #GP(0) at the INT; (c) INT n with IOPL 3 through a DPL3 gate;
 * (d) #UD and #DE in vm86; (e) a gate whose code segment has DPL 3:
 * #GP(selector) at the INT; (f) INT n through a DPL0 gate: #GP(vector*8+2);
 * (g) SMSW and SGDT, which run in vm86 with CR4.UMIP clear, and are #GP(0)
 * with it set (vm86 is CPL 3; SDM vol. 3 §2.5), when CPUID reports UMIP.
 * Each case but (a) leaves vm86 from its handler by jumping back to the
 * kernel stack vm86_enter() saved. */
#include "../lib/kernel.h"

#define VM (1UL << 17)
#define IOPL3 (3UL << 12)
#define IF (1UL << 9)
#define TF (1UL << 8)
#define NT (1UL << 14)
#define RF (1UL << 16)
#define LAPIC 0xFEE00000UL
#define BLOB 0x8000UL                 /* the vm86 code: CS = 0x0800, IP = offset */
#define FLAG ((volatile u8 *)0x8F00)  /* DS = 0x0800, offset 0xF00 */
#define V_CS 0x0800
#define V_SS 0x0900
#define V_SP 0x0800
#define V_ES 0x0A00
#define V_DS 0x0800
#define V_FS 0x0B00
#define V_GS 0x0C00

/* What the entry stub pushes below the CPU's frame: the data segment
 * registers as the handler found them, the general registers, vector and
 * error code; then the vm86 frame. */
struct vframe {
    ulong ds0, es0, fs0, gs0;
    ulong bp, di, si, dx, cx, bx, ax;
    ulong vector, error;
    ulong ip, cs, flags, sp, ss, es, ds, fs, gs;
};

struct vm86_regs { u32 ip, cs, flags, sp, ss, es, ds, fs, gs; };

ulong vm86_enter(const struct vm86_regs *r);
extern char vm86_isr_0[], vm86_isr_3[], vm86_isr_6[], vm86_isr_13[], vm86_isr_64[];
extern char vm86_isr_80[], vm86_isr_81[], vm86_isr_82[];
extern char blob_start[], blob_end[], b_loop[], b_loop_end[], b_int3_after[], b_int50[], b_int50_after[];
extern char b_ud[], b_de[], b_div[], b_int51[], b_int52[], b_smsw[], b_sgdt[], b_umip_after[];

__asm__(
    ".text\n"
    /* ulong vm86_enter(const struct vm86_regs *r): IRET into vm86; comes back
     * through vm86_leave when a handler says so. */
    ".globl vm86_enter\n"
    "vm86_enter:\n"
    "  push %ebp; push %ebx; push %esi; push %edi\n"
    "  mov %esp, vm86_saved_esp\n"
    "  mov 20(%esp), %eax\n"
    "  pushl 32(%eax); pushl 28(%eax); pushl 24(%eax); pushl 20(%eax)\n"
    "  pushl 16(%eax); pushl 12(%eax); pushl 8(%eax); pushl 4(%eax); pushl 0(%eax)\n"
    "  iret\n"
    "vm86_leave:\n"
    "  mov vm86_saved_esp, %esp\n"
    "  pop %edi; pop %esi; pop %ebx; pop %ebp\n"
    "  ret\n"
    ".macro vstub n, err\n"
    ".globl vm86_isr_\\n\n"
    "vm86_isr_\\n:\n"
    "  .if !\\err\n"
    "  push $0\n"
    "  .endif\n"
    "  push $\\n\n"
    "  jmp vm86_common\n"
    ".endm\n"
    "vstub 0, 0\n vstub 3, 0\n vstub 6, 0\n vstub 13, 1\n vstub 64, 0\n"
    "vstub 80, 0\n vstub 81, 0\n vstub 82, 0\n"
    "vm86_common:\n"
    "  push %eax; push %ebx; push %ecx; push %edx; push %esi; push %edi; push %ebp\n"
    "  xor %eax, %eax\n"
    "  mov %gs, %ax; push %eax\n"
    "  mov %fs, %ax; push %eax\n"
    "  mov %es, %ax; push %eax\n"
    "  mov %ds, %ax; push %eax\n"
    "  mov $0x18, %ax; mov %ax, %ds; mov %ax, %es\n"
    "  mov %esp, %eax; push %eax\n"
    "  cld\n"
    "  call vm86_dispatch\n"
    "  add $4, %esp\n"
    "  test %eax, %eax\n"
    "  jnz vm86_leave\n"
    "  add $16, %esp\n"
    "  pop %ebp; pop %edi; pop %esi; pop %edx; pop %ecx; pop %ebx; pop %eax\n"
    "  add $8, %esp\n"
    "  iret\n"
    /* The real-mode code, copied to BLOB; labels are offsets from blob_start. */
    ".data\n"
    ".code16\n"
    ".globl blob_start, blob_end, b_loop, b_loop_end, b_int3_after, b_int50, b_int50_after\n"
    ".globl b_ud, b_de, b_div, b_int51, b_int52, b_smsw, b_sgdt, b_umip_after\n"
    "blob_start:\n"
    "b_loop: cmpb $0, %ds:0xF00\n"         /* (a) spin until the timer handler sets the flag */
    "  je b_loop\n"
    "b_loop_end: int3\n"                  /* leave: INT3 is not IOPL-sensitive */
    "b_int3_after: nop\n"
    "b_int50: int $0x50\n"               /* (b) IOPL 0: #GP(0); (c) IOPL 3: vector 0x50 */
    "b_int50_after: nop\n"
    "b_ud: ud2\n"                        /* (d) */
    "b_de: xor %dx, %dx; mov $1, %ax; xor %cx, %cx\n"
    "b_div: div %cx\n"
    "b_int51: int $0x51\n"               /* (e) gate to a DPL3 code segment */
    "b_int52: int $0x52\n"               /* (f) DPL0 gate */
    "b_smsw: smsw %ax\n"                 /* (g) */
    "b_sgdt: sgdt %ds:0xF10\n"
    "  int3\n"
    "b_umip_after: nop\n"
    "blob_end:\n"
    ".code32\n"
    ".text\n");

ulong vm86_saved_esp;
static volatile struct vframe seen;
static volatile ulong seen_at, seen_flags_in_handler, seen_ss_in_handler;
static volatile int hits, ext_hits;
static volatile struct vframe timer;
static volatile ulong timer_at, timer_flags_in_handler, timer_ss_in_handler;

#define OFF(label) ((u32)((ulong)(label) - (ulong)blob_start))

static inline void apic_write(u32 reg, u32 v) { *(volatile u32 *)(LAPIC + reg) = v; }

/* Called by the stub; non-zero means "leave vm86" (back to vm86_enter's caller). */
ulong vm86_dispatch(struct vframe *f) {
    hits++;
    seen = *f;
    seen_at = (ulong)&f->ip;
    seen_flags_in_handler = read_flags();
    seen_ss_in_handler = read_ss();
    if (f->vector == 64) {
        timer = seen;
        timer_at = seen_at;
        timer_flags_in_handler = seen_flags_in_handler;
        timer_ss_in_handler = seen_ss_in_handler;
    }
    printf("frame vec=%lu err=%#lx ip=%#lx cs=%#lx flags=%#lx sp=%#lx ss=%#lx es=%#lx ds=%#lx fs=%#lx gs=%#lx "
           "entry=%#lx/%#lx/%#lx/%#lx\n", f->vector, f->error, f->ip, f->cs, f->flags, f->sp, f->ss, f->es,
           f->ds, f->fs, f->gs, f->ds0, f->es0, f->fs0, f->gs0);
    if (f->vector == 64) {                 /* the timer: let the loop end, return to vm86 */
        ext_hits++;
        *FLAG = 1;
        apic_write(0xB0, 0);
        return 0;
    }
    return 1;
}

static void set_vgate(int vector, void *entry, int dpl, u16 cs) {
    struct __attribute__((packed)) { u16 limit; u32 base; } idtr;
    __asm__ volatile("sidt %0" : "=m"(idtr));
    u32 off = (u32)(ulong)entry;
    u32 *g = (u32 *)(ulong)(idtr.base + 8 * vector);
    g[0] = (off & 0xFFFF) | ((u32)cs << 16);
    g[1] = (off & 0xFFFF0000) | 0x8E00 | ((u32)dpl << 13);      /* present 32-bit interrupt gate */
}

static ulong run_at(char *label, ulong iopl_if) {
    struct vm86_regs r = { OFF(label), V_CS, VM | 2 | iopl_if, V_SP, V_SS, V_ES, V_DS, V_FS, V_GS };
    hits = 0;
    return vm86_enter(&r);
}

/* The frame every case must see: vm86 selectors pushed, data segments null
 * in the handler, ring 0 on the TSS stack, VM/TF/NT/RF clear in the handler. */
static int frame_common(const volatile struct vframe *v, ulong at, ulong hflags, ulong hss, ulong iopl_if) {
    return v->cs == V_CS && v->sp == V_SP && v->ss == V_SS && v->es == V_ES && v->ds == V_DS
           && v->fs == V_FS && v->gs == V_GS && (v->flags & (VM | IOPL3 | IF)) == (VM | iopl_if)
           && v->ds0 == 0 && v->es0 == 0 && v->fs0 == 0 && v->gs0 == 0
           && at == kernel_stack_end() - 36 && hss == KERNEL_DS
           && !(hflags & (VM | TF | NT | RF | IF));
}

static int frame_ok(const char *name, ulong vector, ulong err, char *ip, ulong iopl_if) {
    int ok = hits == 1 && seen.vector == vector && seen.error == err && seen.ip == OFF(ip)
             && frame_common(&seen, seen_at, seen_flags_in_handler, seen_ss_in_handler, iopl_if);
    check(ok, "%s: vec=%lu err=%#lx ip=%#lx cs=%#lx flags=%#lx sp=%#lx ss=%#lx es/ds/fs/gs=%#lx/%#lx/%#lx/%#lx "
          "null on entry %d, frame at ESP0-%lu", name, seen.vector, seen.error, seen.ip, seen.cs, seen.flags,
          seen.sp, seen.ss, seen.es, seen.ds, seen.fs, seen.gs,
          !(seen.ds0 | seen.es0 | seen.fs0 | seen.gs0), kernel_stack_end() - seen_at);
    return ok;
}


void kmain(void) {
    printf("vm86_32: events from virtual-8086 mode\n");
    memcpy((void *)BLOB, blob_start, blob_end - blob_start);
    set_vgate(0, vm86_isr_0, 0, KERNEL_CS);
    set_vgate(3, vm86_isr_3, 3, KERNEL_CS);
    set_vgate(6, vm86_isr_6, 0, KERNEL_CS);
    set_vgate(13, vm86_isr_13, 0, KERNEL_CS);
    set_vgate(64, vm86_isr_64, 0, KERNEL_CS);
    set_vgate(80, vm86_isr_80, 3, KERNEL_CS);
    set_vgate(81, vm86_isr_81, 3, USER_CS32);      /* a DPL3 code segment: not for vm86 */
    set_vgate(82, vm86_isr_82, 0, KERNEL_CS);

    /* (a) LAPIC one-shot timer while vm86 spins with IF=1, IOPL 0 */
    *FLAG = 0;
    apic_write(0xF0, 0x1FF);                       /* software enable, spurious 0xFF */
    apic_write(0x3E0, 0xB);                        /* divide by 1 */
    apic_write(0x320, 64);                         /* one-shot, vector 64 */
    apic_write(0x380, 100000);
    run_at(b_loop, IF);
    check(ext_hits == 1, "one timer interrupt in vm86 (%d)", ext_hits);
    check(timer.vector == 64 && timer.error == 0 && timer.ip >= OFF(b_loop) && timer.ip < OFF(b_loop_end)
          && frame_common(&timer, timer_at, timer_flags_in_handler, timer_ss_in_handler, IF),
          "timer interrupt in vm86: the nine-dword frame at ESP0-%lu, ip=%#lx flags=%#lx, null data segments",
          kernel_stack_end() - timer_at, timer.ip, timer.flags);
    /* the int3 that ended the loop ran after the IRET back into vm86 */
    check(hits == 2, "two events in this run, the timer then int3 (%d)", hits);
    hits = 1;
    frame_ok("int3 after IRET back into vm86 (segments reloaded)", 3, 0, b_int3_after, IF);
    /* (b) */
    run_at(b_int50, 0);
    frame_ok("INT 0x50 with IOPL 0: #GP(0) at the INT", 13, 0, b_int50, 0);
    /* (c) */
    run_at(b_int50, IOPL3);
    frame_ok("INT 0x50 with IOPL 3 through a DPL3 gate", 80, 0, b_int50_after, IOPL3);
    /* (d) */
    run_at(b_ud, IOPL3);
    frame_ok("#UD in vm86", 6, 0, b_ud, IOPL3);
    run_at(b_de, 0);
    frame_ok("#DE in vm86", 0, 0, b_div, 0);
    /* (e) */
    run_at(b_int51, IOPL3);
    frame_ok("INT 0x51, gate to a DPL3 code segment: #GP(0x20)", 13, USER_CS32 & ~3, b_int51, IOPL3);
    /* (f) */
    run_at(b_int52, IOPL3);
    frame_ok("INT 0x52 through a DPL0 gate: #GP(0x292)", 13, 82 * 8 + 2, b_int52, IOPL3);
    /* (g) */
    u32 a, b, c, d;
    cpuid(7, 0, &a, &b, &c, &d);
    if (c & (1 << 2)) {
        run_at(b_smsw, IOPL3);
        frame_ok("SMSW and SGDT in vm86 with CR4.UMIP clear: run (then INT3)", 3, 0, b_umip_after, IOPL3);
        write_cr4(read_cr4() | (1UL << 11));
        run_at(b_smsw, IOPL3);
        frame_ok("SMSW in vm86 with CR4.UMIP: #GP(0) at the SMSW", 13, 0, b_smsw, IOPL3);
        run_at(b_sgdt, IOPL3);
        frame_ok("SGDT in vm86 with CR4.UMIP: #GP(0) at the SGDT", 13, 0, b_sgdt, IOPL3);
        write_cr4(read_cr4() & ~(1UL << 11));
    } else {
        printf("no UMIP in CPUID: case (g) skipped\n");
    }
    check(read_cs() == KERNEL_CS, "back in ring 0 (CS=%#x)", read_cs());
    test_result();
}
