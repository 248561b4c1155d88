/* XTF-style reporting: check() lines, one final "Test result:" line, power off. */
#include "kernel.h"
#include "xen.h"

int failures;

void check(int ok, const char *what, ...) {
    char buf[256]; va_list ap;
    va_start(ap, what); vsnprintf(buf, sizeof(buf), what, ap); va_end(ap);
    printf("%s %s\n", ok ? "ok" : "FAIL", buf);
    if (!ok) failures++;
}

void debug_exit(u8 v) { for (;;) outb(0xF4, v); }

/* Under Xen, SCHEDOP_shutdown(poweroff); otherwise ACPI PM1a_CNT (q35 PM
 * base 0x600): SLP_TYP=S5 | SLP_EN. */
void poweroff(void) {
    if (xen_present) {
        u32 reason = SHUTDOWN_poweroff;
        HYPERVISOR(sched_op, SCHEDOP_shutdown, &reason);
    }
    outw(0x604, 0x2000);
    for (;;) __asm__ volatile("cli; hlt");
}

void test_result(void) {
    printf("Test result: %s\n", failures ? "FAILURE" : "SUCCESS");
    poweroff();
}
