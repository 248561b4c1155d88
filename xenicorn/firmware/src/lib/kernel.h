/* The xenicorn guest library: what every test kernel shares.
 *
 * Built twice, -m32 and -m64; `ulong` is the native register width so one
 * source serves both. Output goes to the debug console (port 0xE9), the
 * result line follows XTF's convention ("Test result: SUCCESS"), and the
 * kernel powers off through ACPI PM1a (port 0x604) or, under Xen, through
 * SCHEDOP_shutdown. */
#ifndef XENICORN_KERNEL_H
#define XENICORN_KERNEL_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef unsigned long ulong;
typedef long slong;
typedef __builtin_va_list va_list;
#define va_start __builtin_va_start
#define va_arg __builtin_va_arg
#define va_end __builtin_va_end
#define NULL ((void *)0)

/* GDT layout shared by the 32- and 64-bit kernels (selectors). */
#define KERNEL_CS32 0x08
#define KERNEL_CS64 0x10      /* STAR[47:32]: SYSCALL loads CS=0x10, SS=0x18 */
#define KERNEL_DS   0x18
#define USER_CS32   0x23      /* STAR[63:48]=0x20: SYSRET64 CS=0x33, SS=0x2b */
#define USER_DS     0x2b
#define USER_CS64   0x33
#define TSS_SEL     0x38
#ifdef __x86_64__
#define KERNEL_CS KERNEL_CS64
#define USER_CS USER_CS64
#else
#define KERNEL_CS KERNEL_CS32
#define USER_CS USER_CS32
#endif

/* What the ISR stubs push: general registers, then vector and error code,
 * then the hardware frame (sp/ss only after a privilege change in 32-bit
 * mode; always in 64-bit mode). */
struct frame {
#ifdef __x86_64__
    ulong r15, r14, r13, r12, r11, r10, r9, r8;
#endif
    ulong bp, di, si, dx, cx, bx, ax;
    ulong vector, error;
    ulong ip, cs, flags, sp, ss;
};

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" :: "a"(v), "Nd"(port)); }
static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" :: "a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" :: "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u16 inw(u16 port) { u16 v; __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u32 inl(u16 port) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline ulong read_cr0(void) { ulong v; __asm__ volatile("mov %%cr0, %0" : "=r"(v)); return v; }
static inline ulong read_cr2(void) { ulong v; __asm__ volatile("mov %%cr2, %0" : "=r"(v)); return v; }
static inline ulong read_cr3(void) { ulong v; __asm__ volatile("mov %%cr3, %0" : "=r"(v)); return v; }
static inline ulong read_cr4(void) { ulong v; __asm__ volatile("mov %%cr4, %0" : "=r"(v)); return v; }
static inline void write_cr0(ulong v) { __asm__ volatile("mov %0, %%cr0" :: "r"(v) : "memory"); }
static inline void write_cr3(ulong v) { __asm__ volatile("mov %0, %%cr3" :: "r"(v) : "memory"); }
static inline void write_cr4(ulong v) { __asm__ volatile("mov %0, %%cr4" :: "r"(v) : "memory"); }
static inline u16 read_cs(void) { u16 v; __asm__ volatile("mov %%cs, %0" : "=r"(v)); return v; }
static inline u16 read_ss(void) { u16 v; __asm__ volatile("mov %%ss, %0" : "=r"(v)); return v; }
static inline ulong read_flags(void) { ulong v; __asm__ volatile("pushf; pop %0" : "=r"(v)); return v; }
#ifdef __x86_64__
static inline ulong read_sp(void) { ulong v; __asm__ volatile("mov %%rsp, %0" : "=r"(v)); return v; }
#else
static inline ulong read_sp(void) { ulong v; __asm__ volatile("mov %%esp, %0" : "=r"(v)); return v; }
#endif
static inline void wrmsr(u32 msr, u64 v) {
    __asm__ volatile("wrmsr" :: "c"(msr), "a"((u32)v), "d"((u32)(v >> 32)));
}
static inline u64 rdmsr(u32 msr) {
    u32 lo, hi; __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr)); return ((u64)hi << 32) | lo;
}
static inline void cpuid(u32 leaf, u32 sub, u32 *a, u32 *b, u32 *c, u32 *d) {
    __asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(sub));
}

/* console.c */
void putchar(int c);
void puts(const char *s);
int printf(const char *fmt, ...);
int vsnprintf(char *buf, ulong size, const char *fmt, va_list ap);
int snprintf(char *buf, ulong size, const char *fmt, ...);
void *memset(void *d, int c, ulong n);
void *memcpy(void *d, const void *s, ulong n);
int memcmp(const void *a, const void *b, ulong n);
ulong strlen(const char *s);
int strcmp(const char *a, const char *b);
int cmdline_has(const char *cmdline, const char *key, const char *val);   /* a word "key=val" */
u64 divmod64(u64 n, u32 d, u32 *rem);   /* 64-by-32 division; a 32-bit build has no libgcc */

/* desc.c: GDT, TSS, IDT */
typedef void (*handler_t)(struct frame *f);
void desc_init(void);
void set_handler(int vector, handler_t h);
void set_gate(int vector, void *entry, int dpl, int trap, int ist);
void set_gate_present(int vector, int present);
void *isr_entry(int vector);
void set_kernel_stack(ulong sp);     /* TSS esp0/rsp0 */
void set_ist(int n, ulong sp);       /* 64-bit only */
ulong kernel_stack_bottom(void);     /* the TSS (ring-0) stack */
ulong kernel_stack_end(void);
ulong ist_stack_bottom(int n);       /* 64-bit IST stacks 1 and 2 */
ulong ist_stack_top(int n);
void enter_user(void (*fn)(void), ulong user_sp);

/* user.c (opt-in: list it among a kernel's sources): call fn at CPL3, return at CPL0 */
#define USER_RETURN_VECTOR 0x8F
void run_user(void (*fn)(void));
void user_resume(struct frame *f);   /* in a handler of an event from run_user's fn: IRET to run_user's caller */
ulong user_stack_bottom(void);       /* the stack fn runs on */
ulong user_stack_end(void);

/* report.c */
extern const char *kernel_name;
extern int failures;
void check(int ok, const char *what, ...);
/* check that `call` returned `want`, naming it `what` */
#define EXPECT(call, want, what) do { long r_ = (long)(call); \
    check(r_ == (long)(want), "%s = %ld (expected %ld)", what, r_, (long)(want)); } while (0)
void test_result(void);              /* prints the result line and powers off */
void poweroff(void) __attribute__((noreturn));
void debug_exit(u8 v) __attribute__((noreturn));

/* start_info (xen/include/public/arch-x86/hvm/start_info.h) */
struct hvm_start_info {
    u32 magic, version, flags, nr_modules;
    u64 modlist_paddr, cmdline_paddr, rsdp_paddr, memmap_paddr;
    u32 memmap_entries, reserved;
};
struct hvm_memmap_entry { u64 addr, size; u32 type, reserved; };
extern struct hvm_start_info *start_info;
#define HVM_START_MAGIC 0x336ec578

/* ACPI (lib/acpi.c): a table's common header, and the first table with signature
 * `sig` and at least `min_len` bytes whose checksum is good, found from the RSDP */
struct __attribute__((packed)) acpi_sdt {
    char sig[4]; u32 len; u8 rev, csum; char oem[6], table[8]; u32 oem_rev, creator, creator_rev;
};
const struct acpi_sdt *acpi_find_table(const char *sig, u32 min_len);

void kmain(void);                    /* each kernel provides it */
#endif
