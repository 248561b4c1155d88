/* xenstore32 / xenstore64: the dom0 side as a Xen guest sees it.
 *
 *  1. The PV console: text written to the ring at HVM_PARAM_CONSOLE_PFN
 *     and signalled on CONSOLE_EVTCHN reaches the emulator's console.
 *  2. Xenstore over the ring at STORE_PFN / STORE_EVTCHN
 *     (xen/include/public/io/xs_wire.h): read, write, directory, an
 *     ERROR reply, permissions denying access, a watch firing on a write,
 *     a transaction that conflicts (EAGAIN) and succeeds when retried.
 *  3. A grant: grant frame 0 mapped in the xen-platform device's memory
 *     BAR, entry 8 granting a page to dom0 read-only; the reference goes
 *     to data/grant-ref for the emulator side to read the page through.
 *  4. control/shutdown: if the toolstack asked for "poweroff" (the test
 *     pre-seeds it), the guest says so before it powers off. */
#include "../lib/kernel.h"
#include "../lib/xen.h"

#define __HYPERVISOR_event_channel_op 32
#define EVTCHNOP_send 4
#define HVM_PARAM_STORE_PFN 1
#define HVM_PARAM_STORE_EVTCHN 2
#define HVM_PARAM_CONSOLE_PFN 17
#define HVM_PARAM_CONSOLE_EVTCHN 18
enum { XS_DIRECTORY = 1, XS_READ = 2, XS_WATCH = 4, XS_TRANSACTION_START = 6, XS_TRANSACTION_END = 7,
       XS_GET_DOMAIN_PATH = 10, XS_WRITE = 11, XS_WATCH_EVENT = 15, XS_ERROR = 16 };

struct xen_add_to_physmap { u16 domid, size; u32 space; ulong idx, gpfn; };
struct xsd_sockmsg { u32 type, req_id, tx_id, len; };
struct xs_ring {
    char req[1024], rsp[1024];
    volatile u32 req_cons, req_prod, rsp_cons, rsp_prod;
};
struct cons_ring {
    char in[1024], out[2048];
    volatile u32 in_cons, in_prod, out_cons, out_prod;
};

#define EXPECT(cond, ...) check(cond, __VA_ARGS__)

static struct xs_ring *xs;
static u32 xs_port, con_port;
static u32 req_id = 1;
static char reply[4097];
static u32 reply_type, reply_len;
static char event[256];
static int events_seen;
static u8 shared_page[4096] __attribute__((aligned(4096)));

static u64 get_param(u32 index) {
    struct xen_hvm_param p = { DOMID_SELF, index, 0 };
    long r = HYPERVISOR(hvm_op, 1, &p);
    return r ? (u64)-1 : p.value;
}

static void notify(u32 port) {
    u32 p = port;
    xen_hypercall(__HYPERVISOR_event_channel_op, EVTCHNOP_send, (ulong)&p, 0, 0, 0);
}

/* -- the PV console ---------------------------------------------------------- */
static void pv_console_write(const char *s) {
    struct cons_ring *c = (struct cons_ring *)(ulong)(get_param(HVM_PARAM_CONSOLE_PFN) << 12);
    u32 prod = c->out_prod;
    for (; *s; s++)
        c->out[prod++ & 2047] = *s;
    __asm__ volatile("" ::: "memory");
    c->out_prod = prod;
    notify(con_port);
}

/* -- xenstore --------------------------------------------------------------- */
static void ring_write(const void *data, u32 len) {
    const char *p = data;
    for (u32 i = 0; i < len; i++) {
        while (xs->req_prod - xs->req_cons >= 1024)
            notify(xs_port);                           /* full: let xenstored drain it */
        xs->req[xs->req_prod & 1023] = p[i];
        __asm__ volatile("" ::: "memory");
        xs->req_prod++;
    }
}

static void ring_read(void *data, u32 len) {
    char *p = data;
    for (u32 i = 0; i < len; i++) {
        while (xs->rsp_prod == xs->rsp_cons)
            __asm__ volatile("pause");
        p[i] = xs->rsp[xs->rsp_cons & 1023];
        xs->rsp_cons++;
    }
}

/* one request; returns the reply type. Watch events met on the way are kept. */
static u32 xs_request(u32 type, u32 tx, const char *a, const char *b, u32 blen) {
    u32 alen = a ? strlen(a) + 1 : 0;
    struct xsd_sockmsg h = { type, req_id++, tx, alen + blen };
    ring_write(&h, sizeof(h));
    if (alen)
        ring_write(a, alen);
    if (blen)
        ring_write(b, blen);
    notify(xs_port);
    for (;;) {
        struct xsd_sockmsg r;
        ring_read(&r, sizeof(r));
        if (r.len > 4096)
            return 0;
        ring_read(reply, r.len);
        reply[r.len] = 0;
        if (r.type == XS_WATCH_EVENT) {
            memcpy(event, reply, r.len < sizeof(event) ? r.len : sizeof(event) - 1);
            events_seen++;
            continue;
        }
        reply_type = r.type;
        reply_len = r.len;
        return r.type;
    }
}

static const char *xs_read(const char *path, u32 tx) {
    return xs_request(XS_READ, tx, path, 0, 0) == XS_READ ? reply : 0;
}

static int xs_write(const char *path, const char *value, u32 tx) {
    return xs_request(XS_WRITE, tx, path, value, strlen(value)) == XS_WRITE;
}

static void test_xenstore(void) {
    const char *v = xs_read("name", 0);
    EXPECT(v && !strcmp(v, "xenicorn"), "read name: %s", v ? v : "(error)");
    EXPECT(xs_request(XS_GET_DOMAIN_PATH, 0, "1", 0, 0) == XS_GET_DOMAIN_PATH && !strcmp(reply, "/local/domain/1"),
           "our domain path is %s", reply);
    EXPECT(xs_write("data/hello", "world", 0), "write data/hello");
    v = xs_read("data/hello", 0);
    EXPECT(v && !strcmp(v, "world"), "and read it back");
    xs_request(XS_DIRECTORY, 0, "data", 0, 0);
    int found = 0;
    for (u32 off = 0; off < reply_len; off += strlen(reply + off) + 1)
        found |= !strcmp(reply + off, "hello");
    EXPECT(found, "directory data lists hello");
    EXPECT(xs_request(XS_READ, 0, "data/missing", 0, 0) == XS_ERROR && !strcmp(reply, "ENOENT"),
           "reading a missing node: ERROR %s", reply);
    EXPECT(xs_request(XS_WRITE, 0, "/local/domain/0/name", "evil", 4) == XS_ERROR && !strcmp(reply, "EACCES"),
           "writing dom0's name: ERROR %s", reply);
    EXPECT(xs_request(XS_READ, 0, "/local/domain/1/memory/target", 0, 0) == XS_READ, "memory/target is %s KiB", reply);

    /* a watch fires once when set, then on a write below it */
    EXPECT(xs_request(XS_WATCH, 0, "data/watched", "tok\0", 4) == XS_WATCH, "watch data/watched");
    int before = events_seen;
    xs_write("data/watched/x", "1", 0);
    xs_read("data/hello", 0);                              /* any request collects pending events */
    EXPECT(events_seen > before && !strcmp(event, "data/watched/x") && !strcmp(event + 15, "tok"),
           "watch event %s token %s", event, event + 15);

    /* a transaction that conflicts, then succeeds */
    xs_write("data/counter", "1", 0);
    int attempts = 0, committed = 0;
    while (!committed && attempts < 5) {
        attempts++;
        xs_request(XS_TRANSACTION_START, 0, "", 0, 0);
        u32 tx = 0;
        for (const char *p = reply; *p; p++)
            tx = tx * 10 + (u32)(*p - '0');
        v = xs_read("data/counter", tx);
        char next[8] = { (char)(v ? v[0] + 1 : '?'), 0 };
        xs_write("data/counter", next, tx);
        if (attempts == 1)
            xs_write("data/counter", "7", 0);              /* someone else changes it meanwhile */
        u32 r = xs_request(XS_TRANSACTION_END, tx, "T", 0, 0);
        if (r == XS_ERROR)
            EXPECT(!strcmp(reply, "EAGAIN"), "attempt %d: ERROR %s, retry", attempts, reply);
        else
            committed = 1;
    }
    v = xs_read("data/counter", 0);
    EXPECT(committed && attempts == 2 && v && !strcmp(v, "8"), "transaction committed on attempt %d: counter %s",
           attempts, v ? v : "?");
}

/* -- a grant ------------------------------------------------------------------ */
static u32 pci_read(int slot, int reg) { outl(0xCF8, 0x80000000u | (slot << 11) | reg); return inl(0xCFC); }

static void test_grant(void) {
    ulong bar1 = pci_read(2, 0x14) & ~0xFUL;
    EXPECT(bar1 != 0, "xen-platform BAR1 at %#lx", bar1);
    struct xen_add_to_physmap xatp = { DOMID_SELF, 0, 1, 0, bar1 >> 12 };
    EXPECT(HYPERVISOR(memory_op, 7, &xatp) == 0, "grant frame 0 mapped in BAR1");
    volatile u16 *entry = (volatile u16 *)(bar1 + 8 * 8);          /* reference 8 */
    memcpy(shared_page, "shared by the guest", 20);
    *(volatile u32 *)(entry + 2) = (u32)((ulong)shared_page >> 12);  /* frame */
    entry[1] = 0;                                                   /* domid: dom0 */
    __asm__ volatile("" ::: "memory");
    entry[0] = 1 | 4;                                               /* permit_access | readonly */
    EXPECT(xs_write("data/grant-ref", "8", 0), "grant reference 8 published in data/grant-ref");
}

void kmain(void) {
    printf("xenstore%d: the dom0 side of a Xen guest\n", (int)sizeof(ulong) * 8);
    xen_install_hypercall_page();
    u64 store_pfn = get_param(HVM_PARAM_STORE_PFN), con_pfn = get_param(HVM_PARAM_CONSOLE_PFN);
    xs_port = (u32)get_param(HVM_PARAM_STORE_EVTCHN);
    con_port = (u32)get_param(HVM_PARAM_CONSOLE_EVTCHN);
    EXPECT(store_pfn && store_pfn != (u64)-1 && xs_port, "xenstore ring at pfn %#llx, port %u",
           (unsigned long long)store_pfn, xs_port);
    EXPECT(con_pfn && con_pfn != (u64)-1 && con_port, "console ring at pfn %#llx, port %u",
           (unsigned long long)con_pfn, con_port);
    xs = (struct xs_ring *)(ulong)(store_pfn << 12);
    pv_console_write("hello from the PV console\n");
    test_xenstore();
    test_grant();
    const char *req = xs_read("control/shutdown", 0);
    if (req && *req)
        printf("the toolstack asks for %s\n", req);
    const char *cmdline = (const char *)(ulong)start_info->cmdline_paddr;
    if (cmdline && !strcmp(cmdline, "echo")) {
        /* one line of PV console input, echoed (xenicorn run ... --console-input stdin) */
        struct cons_ring *c = (struct cons_ring *)(ulong)(con_pfn << 12);
        char line[128];
        u32 n = 0;
        u64 t0 = 0, now = 0;
        HYPERVISOR(hvm_op, 10, &t0);
        while (n < sizeof(line) - 1) {
            if (c->in_cons == c->in_prod) {
                HYPERVISOR(hvm_op, 10, &now);              /* give up after 10 s without input */
                if (now - t0 > 10000000000ULL)
                    break;
                continue;
            }
            char ch = c->in[c->in_cons & 1023];
            c->in_cons++;
            if (ch == '\n')
                break;
            line[n++] = ch;
        }
        line[n] = 0;
        notify(con_port);
        printf("console input: %s\n", line);
        check(n > 0, "a line arrived on the PV console");
    }
}
