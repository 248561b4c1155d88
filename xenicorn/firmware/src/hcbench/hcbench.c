/* hcbench32 / hcbench64: N cheap hypercalls in a loop, for benchmarks.
 * The command line gives N ("n=100000"); the kernel calls
 * xen_version(XENVER_version) through the hypercall page N times. */
#include "../lib/kernel.h"
#include "../lib/xen.h"

static ulong arg_n(const char *s) {
    for (; s && *s; s++)
        if (s[0] == 'n' && s[1] == '=') {
            ulong n = 0;
            for (s += 2; *s >= '0' && *s <= '9'; s++)
                n = n * 10 + (*s - '0');
            return n;
        }
    return 1000;
}

void kmain(void) {
    xen_install_hypercall_page();
    ulong n = arg_n((const char *)(ulong)start_info->cmdline_paddr);
    long v = 0;
    for (ulong i = 0; i < n; i++)
        v = HYPERVISOR(xen_version, 0, 0);
    printf("%lu hypercalls, version %#lx\n", n, v);
}
