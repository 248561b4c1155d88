/* gnttab32 / gnttab64: grant tables version 2 from the guest's side.
 *
 * Facts from xen/include/public/grant_table.h and xen/common/grant_table.c.
 *  1. Versions: v1 at start; set_version 0 and 3 refused (-EINVAL) with the
 *     version in force written back; a reserved v1 entry survives the
 *     switch to v2 (converted), an ordinary one is wiped.
 *  2. Status frames: mapped with XENMAPIDX_grant_table_status (bit 31) next
 *     to grant frame 0 in the xen-platform BAR, listed by
 *     get_status_frames; too many frames, another domain, a bad list and a
 *     bad gfn are refused with Xen's codes.
 *  3. dom0: a full-page grant and a sub-page grant; the guest prints
 *     "gnttab: dom0 map" and the emulator's dom0 side (the test) maps,
 *     reads and writes them then. While the page is mapped the status word
 *     shows GTF_reading|GTF_writing and set_version(1) is -EBUSY; after
 *     "gnttab: dom0 unmap" the word is clear.
 *  4. GNTTABOP_copy between the guest's own frames and grants it gave
 *     itself, with each status Xen gives (sub-page window, page end,
 *     bad reference, transitive, read-only, bad frame, foreign frame).
 *  5. Back to v1: allowed once idle, status frames gone; a reserved v2
 *     entry v1 cannot express makes it -ERANGE.
 * Without the test's dom0 side the checks of step 3 fail. */
#include "../lib/kernel.h"
#include "../lib/xen.h"

#define __HYPERVISOR_grant_table_op 20
enum { SETUP_TABLE = 2, COPY = 5, QUERY_SIZE = 6, SET_VERSION = 8, GET_STATUS_FRAMES = 9, GET_VERSION = 10 };
enum { GNTST_okay = 0, GNTST_general_error = -1, GNTST_bad_domain = -2, GNTST_bad_gntref = -3,
       GNTST_bad_virt_addr = -5, GNTST_permission_denied = -8, GNTST_bad_page = -9, GNTST_bad_copy_arg = -10 };
#define GTF_permit_access 1
#define GTF_transitive 3
#define GTF_readonly (1 << 2)
#define GTF_reading (1 << 3)
#define GTF_writing (1 << 4)
#define GTF_sub_page (1 << 8)
#define GNTCOPY_source_gref 1
#define GNTCOPY_dest_gref 2
#define XENMAPIDX_grant_table_status 0x80000000UL
#define EBUSY 16
#define ERANGE 34
#define MY_DOMID 1                         /* xenicorn's domU (/local/domain/1) */
#define BAD_PTR 0xC0000000UL               /* not RAM (64-bit: mapped by our page tables) */
#define PFN(p) ((ulong)(p) >> 12)

struct xen_add_to_physmap { u16 domid, size; u32 space; ulong idx, gpfn; };
struct query_size { u16 dom; u32 nr_frames, max_nr_frames; short status; };
struct get_version { u16 dom, pad; u32 version; };
struct get_status_frames { u32 nr_frames; u16 dom; short status; u64 *frame_list; };
struct copy_ptr { union { u32 ref; ulong gmfn; } u; u16 domid, offset; };
struct gnttab_copy { struct copy_ptr source, dest; u16 len, flags; short status; };


static u8 page_a[4096] __attribute__((aligned(4096)));
static u8 page_b[4096] __attribute__((aligned(4096)));
static u8 page_c[4096] __attribute__((aligned(4096)));
static u8 *grant;                          /* grant frame 0 */
static volatile u16 *status;               /* status frame 0 */
static ulong status_gpfn;

static long gnttab(int cmd, void *arg, u32 count) { return HYPERVISOR3(grant_table_op, cmd, arg, count); }
static u32 pci_read(int slot, int reg) { outl(0xCF8, 0x80000000u | (slot << 11) | reg); return inl(0xCFC); }

static long set_version(u32 v, u32 *now) { u32 op = v; long r = gnttab(SET_VERSION, &op, 1); *now = op; return r; }
static u32 get_version(void) { struct get_version g = { DOMID_SELF, 0, 0 }; gnttab(GET_VERSION, &g, 1); return g.version; }
static long add_frame(ulong idx, ulong gpfn) {
    struct xen_add_to_physmap x = { DOMID_SELF, 0, 1, idx, gpfn };
    return HYPERVISOR(memory_op, 7, &x);
}

/* v1 entry: u16 flags, domid; u32 frame.  v2: u16 flags, domid; then
 * {u32 pad0; u64 frame} or {u16 page_off, length; u64 frame} or
 * {u16 trans_domid, pad0; u32 gref}. Written field by field, flags last. */
static void grant_v1(int ref, u16 flags, u16 domid, u32 frame) {
    volatile u16 *e = (volatile u16 *)(grant + 8 * ref);
    *(volatile u32 *)(e + 2) = frame; e[1] = domid; __asm__ volatile("" ::: "memory"); e[0] = flags;
}
static void grant_v2(int ref, u16 flags, u16 domid, u16 w0, u16 w1, u64 frame) {
    volatile u16 *e = (volatile u16 *)(grant + 16 * ref);
    e[2] = w0; e[3] = w1; *(volatile u64 *)(e + 4) = frame; e[1] = domid;
    __asm__ volatile("" ::: "memory"); e[0] = flags;
}
static void transitive(int ref, u16 domid, u16 trans_domid, u32 gref) {
    volatile u16 *e = (volatile u16 *)(grant + 16 * ref);
    e[2] = trans_domid; e[3] = 0; *(volatile u32 *)(e + 4) = gref; e[1] = domid;
    __asm__ volatile("" ::: "memory"); e[0] = GTF_transitive;
}

static void test_versions(ulong bar1) {
    u32 now = 0;
    EXPECT(get_version(), 1, "version at start");
    EXPECT(set_version(3, &now), -EINVAL, "set_version(3)");
    check(now == 1, "set_version(3) wrote back version %u", now);
    EXPECT(set_version(0, &now), -EINVAL, "set_version(0)");
    EXPECT(add_frame(0, PFN(bar1)), 0, "grant frame 0 mapped in BAR1");
    EXPECT(add_frame(XENMAPIDX_grant_table_status, PFN(bar1) + 1), -EINVAL, "a status frame in v1");
    struct get_status_frames gs = { 1, DOMID_SELF, 99, (u64 *)page_c };
    EXPECT(gnttab(GET_STATUS_FRAMES, &gs, 1), 0, "get_status_frames in v1");
    EXPECT(gs.status, GNTST_general_error, "its status (v1 has none)");
    grant_v1(2, GTF_permit_access | GTF_readonly, 0, (u32)PFN(page_a));   /* reserved: kept */
    grant_v1(20, GTF_permit_access, 0, (u32)PFN(page_b));                 /* ordinary: wiped */
    EXPECT(set_version(2, &now), 0, "set_version(2)");
    check(now == 2 && get_version() == 2, "now version %u (get_version %u)", now, get_version());
    volatile u16 *e2 = (volatile u16 *)(grant + 32);
    check(e2[0] == (GTF_permit_access | GTF_readonly) && e2[1] == 0 && *(volatile u64 *)(e2 + 4) == PFN(page_a),
          "reserved entry 2 converted to v2 (flags %#x)", e2[0]);
    check(*(volatile u32 *)(grant + 160) == 0 && *(volatile u32 *)(grant + 164) == 0, "entry 20 wiped");
}

static void test_status_frames(ulong bar1) {
    struct query_size q = { DOMID_SELF, 0, 0, 99 };
    EXPECT(gnttab(QUERY_SIZE, &q, 1), 0, "query_size");
    check(q.status == 0 && q.nr_frames == 1 && q.max_nr_frames == 64, "%u of %u frames (v2: 256 entries each)",
          q.nr_frames, q.max_nr_frames);
    status_gpfn = PFN(bar1) + 1;
    EXPECT(add_frame(XENMAPIDX_grant_table_status, status_gpfn), 0, "status frame 0 mapped after grant frame 0");
    EXPECT(add_frame(XENMAPIDX_grant_table_status | 8, status_gpfn + 1), -EINVAL,
           "status frame 8 (needs 72 grant frames)");
    EXPECT(add_frame(XENMAPIDX_grant_table_status, 0xFEE00), -EINVAL, "status frame over the LAPIC (bad gfn)");
    status = (volatile u16 *)(status_gpfn << 12);
    u64 list[2] = { 0, 0 };
    struct get_status_frames gs = { 1, DOMID_SELF, 99, list };
    EXPECT(gnttab(GET_STATUS_FRAMES, &gs, 1), 0, "get_status_frames(1)");
    check(gs.status == 0 && list[0] == status_gpfn, "status frame 0 at gpfn %#llx", (unsigned long long)list[0]);
    gs.nr_frames = 2;
    EXPECT(gnttab(GET_STATUS_FRAMES, &gs, 1), 0, "get_status_frames(2)");
    EXPECT(gs.status, GNTST_general_error, "2 status frames of 1");
    gs.nr_frames = 1; gs.dom = 7;
    gnttab(GET_STATUS_FRAMES, &gs, 1);
    EXPECT(gs.status, GNTST_bad_domain, "get_status_frames of domain 7");
    gs.dom = DOMID_SELF; gs.frame_list = (u64 *)BAD_PTR;
    gnttab(GET_STATUS_FRAMES, &gs, 1);
    EXPECT(gs.status, GNTST_bad_virt_addr, "get_status_frames into a bad list");
    EXPECT(gnttab(GET_STATUS_FRAMES, &gs, 2), -EINVAL, "get_status_frames count 2");
    check(status[2] == 0, "status of the reserved entry: %#x", status[2]);
}

static void test_dom0(void) {
    u32 now = 0;
    memcpy(page_a, "full page for dom0", 19);
    memcpy(page_b + 256, "sub-page for dom0", 18);
    grant_v2(8, GTF_permit_access, 0, 0, 0, PFN(page_a));
    grant_v2(9, GTF_permit_access | GTF_readonly | GTF_sub_page, 0, 256, 64, PFN(page_b));
    transitive(10, 0, MY_DOMID, 8);
    puts("gnttab: dom0 map\n");
    check(status[8] == (GTF_reading | GTF_writing), "status of mapped entry 8: %#x", status[8]);
    check(status[9] == 0 && status[10] == 0, "entries 9 and 10 not in use: %#x %#x", status[9], status[10]);
    check(!memcmp(page_a + 100, "dom0 was here", 13), "dom0 wrote through grant 8");
    EXPECT(set_version(1, &now), -EBUSY, "set_version(1) while entry 8 is mapped");
    check(now == 2 && get_version() == 2, "still version %u", now);
    puts("gnttab: dom0 unmap\n");
    check(status[8] == 0, "status of entry 8 after unmap: %#x", status[8]);
}

static void test_copy(void) {
    grant_v2(12, GTF_permit_access, MY_DOMID, 0, 0, PFN(page_c));
    grant_v2(13, GTF_permit_access | GTF_readonly | GTF_sub_page, MY_DOMID, 4000, 96, PFN(page_a));
    transitive(14, MY_DOMID, MY_DOMID, 12);
    grant_v2(15, GTF_permit_access | GTF_readonly, MY_DOMID, 0, 0, PFN(page_b));
    memcpy(page_a + 4000, "the last 96 bytes", 18);
    enum { G = DOMID_SELF, S = GNTCOPY_source_gref, D = GNTCOPY_dest_gref };
    static struct { ulong src; u16 sdom, soff; ulong dst; u16 ddom, doff, len, flags; short want; const char *what; } t[] = {
        { 0, G, 100, 12, G, 0, 13, D, GNTST_okay, "frame -> own grant 12" },
        { 13, G, 4000, 0, G, 200, 96, S, GNTST_okay, "sub-page grant 13 -> frame" },
        { 13, G, 4000, 0, G, 0, 200, S, GNTST_bad_copy_arg, "sub-page grant past the page end" },
        { 13, G, 3990, 0, G, 0, 20, S, GNTST_general_error, "outside the sub-page window" },
        { 999999, G, 0, 0, G, 0, 8, S, GNTST_bad_gntref, "bad reference" },
        { 14, G, 0, 0, G, 0, 8, S, GNTST_general_error, "transitive grant" },
        { 0, G, 0, 15, G, 0, 8, D, GNTST_general_error, "into a read-only grant" },
        { PFN(BAD_PTR), G, 0, 0, G, 0, 8, 0, GNTST_bad_page, "from a frame that is not RAM" },
        { 0, 0, 0, 0, G, 0, 8, 0, GNTST_permission_denied, "dom0's frame" },
        { 999999, 7, 5000, 0, 7, 5000, 0, S | D, GNTST_okay, "length 0 (nothing checked)" },
    };
    enum { N = sizeof(t) / sizeof(t[0]) };
    static struct gnttab_copy ops[N];
    for (int i = 0; i < N; i++) {
        int s_is_ref = t[i].flags & S, d_is_ref = t[i].flags & D;
        ulong src = t[i].src ? t[i].src : PFN(page_a), dst = t[i].dst ? t[i].dst : PFN(page_c);
        ops[i].source.u.gmfn = 0; ops[i].dest.u.gmfn = 0;
        if (s_is_ref) ops[i].source.u.ref = (u32)src; else ops[i].source.u.gmfn = src;
        if (d_is_ref) ops[i].dest.u.ref = (u32)dst; else ops[i].dest.u.gmfn = dst;
        ops[i].source.domid = t[i].sdom; ops[i].source.offset = t[i].soff;
        ops[i].dest.domid = t[i].ddom; ops[i].dest.offset = t[i].doff;
        ops[i].len = t[i].len; ops[i].flags = t[i].flags; ops[i].status = 99;
    }
    EXPECT(gnttab(COPY, ops, N), 0, "GNTTABOP_copy with 10 ops");
    for (int i = 0; i < N; i++)
        check(ops[i].status == t[i].want, "copy %s: status %d", t[i].what, ops[i].status);
    check(!memcmp(page_c, "dom0 was here", 13), "grant 12 received the bytes dom0 wrote");
    check(!memcmp(page_c + 200, "the last 96 bytes", 18), "the sub-page's bytes arrived");
    EXPECT(gnttab(COPY, (void *)BAD_PTR, 1), -EFAULT, "GNTTABOP_copy from a bad pointer");
}

static void test_back_to_v1(void) {
    u32 now = 0;
    EXPECT(set_version(1, &now), 0, "set_version(1) once idle");
    check(now == 1 && get_version() == 1, "version %u", now);
    check(*(volatile u16 *)(grant + 16) == (GTF_permit_access | GTF_readonly) &&
          *(volatile u32 *)(grant + 20) == PFN(page_a), "reserved entry 2 back in v1 form");
    u64 list[1];
    struct get_status_frames gs = { 1, DOMID_SELF, 99, list };
    gnttab(GET_STATUS_FRAMES, &gs, 1);
    EXPECT(gs.status, GNTST_general_error, "no status frames in v1");
    EXPECT(set_version(2, &now), 0, "set_version(2) again");
    grant_v2(3, GTF_permit_access, 0, 0, 0, 1ULL << 32);                  /* frame beyond 32 bits */
    EXPECT(set_version(1, &now), -ERANGE, "set_version(1) with reserved entry 3 at frame 2^32");
    check(now == 2, "still version %u", now);
    grant_v2(3, 0, 0, 0, 0, 0);
    EXPECT(set_version(1, &now), 0, "set_version(1)");
}

void kmain(void) {
    printf("gnttab%d: grant tables v2 from the guest's side\n", (int)sizeof(ulong) * 8);
    xen_install_hypercall_page();
    ulong bar1 = pci_read(2, 0x14) & ~0xFUL;
    check(bar1 != 0, "xen-platform BAR1 at %#lx", bar1);
    grant = (u8 *)bar1;
    test_versions(bar1);
    test_status_frames(bar1);
    test_dom0();
    test_copy();
    test_back_to_v1();
    test_result();
}
