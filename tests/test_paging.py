"""The guest page-table walker, mode by mode (SDM vol. 3 chapter 4).

Unit tests build page tables in a dict-backed "physical memory"; a
hypothesis test then checks the walker against the MMU inside Unicorn on
random tables, since that is the MMU the guest really runs on.
"""

from hypothesis import HealthCheck, given, settings, strategies as st

from xenicorn.x86.paging import PF_I, PF_P, PF_RSVD, PF_U, PF_W, PageFault, PagingRegs, Translation, translate

P, RW, US, A, D, PS = 1, 2, 4, 0x20, 0x40, 0x80
XD = 1 << 63
CR0_PG_PE, CR0_WP = 0x80000001, 1 << 16
CR4_PSE, CR4_PAE, CR4_SMEP, CR4_SMAP = 1 << 4, 1 << 5, 1 << 20, 1 << 21
LMA, NXE = 1 << 10, 1 << 11


class Phys:
    """Sparse little-endian physical memory; reads outside 'RAM' raise."""

    def __init__(self, limit=1 << 32):
        self.mem = {}
        self.limit = limit

    def read(self, addr, size):
        if addr + size > self.limit:
            raise ValueError("not RAM")
        return int.from_bytes(bytes(self.mem.get(addr + i, 0) for i in range(size)), "little")

    def write(self, addr, size, value):
        for i in range(size):
            self.mem[addr + i] = (value >> (8 * i)) & 0xFF

    def walk(self, regs, va, **kw):
        return translate(regs, va, self.read, write_phys=self.write, **kw)


def regs(mode, cr0=0, cr4=0, efer=0, cr3=0x1000):
    if mode == "none":
        return PagingRegs(0x11, 0, 0, 0)
    if mode == "32-bit":
        return PagingRegs(CR0_PG_PE | cr0, cr3, cr4, efer)
    if mode == "pae":
        return PagingRegs(CR0_PG_PE | cr0, cr3, CR4_PAE | cr4, efer)
    return PagingRegs(CR0_PG_PE | cr0, cr3, CR4_PAE | cr4, LMA | efer)


def map32(mem, va, pa, pde_flags=P | RW | US, pte_flags=P | RW | US):
    mem.write(0x1000 + (va >> 22) * 4, 4, 0x2000 | pde_flags)
    mem.write(0x2000 + ((va >> 12) & 0x3FF) * 4, 4, pa | pte_flags)


def map_pae(mem, va, pa, flags=P | RW | US, pdpte=P):
    mem.write(0x1000 + ((va >> 30) & 3) * 8, 8, 0x2000 | pdpte)
    mem.write(0x2000 + ((va >> 21) & 0x1FF) * 8, 8, 0x3000 | (flags & ~XD & 0xFFF))
    mem.write(0x3000 + ((va >> 12) & 0x1FF) * 8, 8, pa | flags)


def map4(mem, va, pa, leaf=P | RW | US, upper=P | RW | US):
    tables = [0x1000, 0x2000, 0x3000, 0x4000]
    for level, shift in enumerate((39, 30, 21)):
        mem.write(tables[level] + ((va >> shift) & 0x1FF) * 8, 8, tables[level + 1] | upper)
    mem.write(0x4000 + ((va >> 12) & 0x1FF) * 8, 8, pa | leaf)


# -- no paging -------------------------------------------------------------
def test_no_paging_is_identity_and_never_faults():
    t = Phys().walk(regs("none"), 0x12345678, write=True, user=True)
    assert isinstance(t, Translation) and t.phys == 0x12345678


# -- 32-bit paging ------------------------------------------------------------
def test_32bit_4k_translation_sets_accessed_and_dirty():
    mem = Phys()
    map32(mem, 0x00401000, 0x00777000)
    t = mem.walk(regs("32-bit"), 0x00401234, write=True)
    assert t.phys == 0x00777234 and t.page_size == 4096
    assert mem.read(0x1000 + 1 * 4, 4) & A
    assert mem.read(0x2000 + 1 * 4, 4) & (A | D) == A | D


def test_32bit_not_present_pde_and_pte_error_codes():
    mem = Phys()
    f = mem.walk(regs("32-bit"), 0x00400000)
    assert isinstance(f, PageFault) and f.error_code == 0 and f.linear == 0x00400000
    map32(mem, 0x00400000, 0x5000, pte_flags=0)
    assert mem.walk(regs("32-bit"), 0x00400010, write=True, user=True).error_code == PF_W | PF_U


def test_32bit_fault_leaves_accessed_bits_alone():
    mem = Phys()
    map32(mem, 0x00400000, 0x5000, pte_flags=P)              # read-only, supervisor
    assert isinstance(mem.walk(regs("32-bit"), 0x00400000, user=True), PageFault)
    assert not mem.read(0x2000, 4) & A


def test_32bit_read_only_honours_cr0_wp_for_supervisor_writes():
    mem = Phys()
    map32(mem, 0x00400000, 0x5000, pte_flags=P | US)
    assert isinstance(mem.walk(regs("32-bit"), 0x00400000, write=True), Translation)
    f = mem.walk(regs("32-bit", cr0=CR0_WP), 0x00400000, write=True)
    assert f.error_code == PF_P | PF_W
    assert mem.walk(regs("32-bit"), 0x00400000, write=True, user=True).error_code == PF_P | PF_W | PF_U


def test_32bit_user_access_to_supervisor_page():
    mem = Phys()
    map32(mem, 0x00400000, 0x5000, pde_flags=P | RW)           # U/S clear at the PDE
    assert mem.walk(regs("32-bit"), 0x00400000, user=True).error_code == PF_P | PF_U


def test_32bit_4mib_pages_need_cr4_pse_and_support_pse36():
    mem = Phys()
    mem.write(0x1000 + 2 * 4, 4, 0x00C00000 | (0x3 << 13) | PS | P | RW)   # phys bits 32-33 = 3
    t = mem.walk(regs("32-bit", cr4=CR4_PSE), 0x00812345)
    assert t.page_size == 4 << 20 and t.phys == 0x3_00C12345
    # without PSE the same entry points at a page table (an empty one here)
    assert isinstance(mem.walk(regs("32-bit"), 0x00812345), PageFault)


def test_32bit_supervisor_protection_smep_and_smap():
    mem = Phys()
    map32(mem, 0x00400000, 0x5000)                               # user page
    assert mem.walk(regs("32-bit", cr4=CR4_SMEP), 0x00400000, fetch=True).error_code == PF_P | PF_I
    assert mem.walk(regs("32-bit", cr4=CR4_SMAP), 0x00400000).error_code == PF_P
    assert isinstance(mem.walk(regs("32-bit", cr4=CR4_SMEP), 0x00400000), Translation)


# -- PAE ------------------------------------------------------------------
def test_pae_translation_and_not_present_pdpte():
    mem = Phys()
    map_pae(mem, 0x40201000, 0x9000)
    assert mem.walk(regs("pae"), 0x40201ABC).phys == 0x9ABC
    assert mem.walk(regs("pae"), 0x80000000).error_code == 0


def test_pae_nx_requires_efer_nxe():
    mem = Phys()
    map_pae(mem, 0x00400000, 0x9000, flags=P | RW | XD)
    f = mem.walk(regs("pae", efer=NXE), 0x00400000, fetch=True)
    assert f.error_code == PF_P | PF_I
    assert isinstance(mem.walk(regs("pae", efer=NXE), 0x00400000), Translation)
    f = mem.walk(regs("pae"), 0x00400000)                        # XD with NXE=0: reserved bit
    assert f.error_code & PF_RSVD and f.error_code & PF_P


def test_pae_2mib_page_and_reserved_pdpte_bits():
    mem = Phys()
    mem.write(0x1000, 8, 0x2000 | P)
    mem.write(0x2000 + 3 * 8, 8, 0x00600000 | PS | P | RW)
    assert mem.walk(regs("pae"), 0x00612345).phys == 0x00612345
    mem.write(0x1000 + 8, 8, 0x2000 | P | RW)                    # RW is reserved in a PAE PDPTE
    assert mem.walk(regs("pae"), 0x40000000).error_code & PF_RSVD


# -- 4-level ----------------------------------------------------------------
def test_4level_4k_1g_and_2m_pages():
    mem = Phys()
    map4(mem, 0x7F12_3456_7000, 0xABC000)
    assert mem.walk(regs("4-level"), 0x7F12_3456_7123).phys == 0xABC123
    mem.write(0x1000 + 0x1FF * 8, 8, 0x5000 | P | RW)           # top 512 GiB
    mem.write(0x5000 + 0x1FE * 8, 8, 0x40000000 | PS | P | RW)  # 1 GiB page
    t = mem.walk(regs("4-level"), 0xFFFF_FFFF_8012_3456)
    assert t.page_size == 1 << 30 and t.phys == 0x40123456
    mem.write(0x5000 + 0x1FF * 8, 8, 0x6000 | P | RW)
    mem.write(0x6000, 8, 0x00200000 | PS | P | RW)              # 2 MiB page
    assert mem.walk(regs("4-level"), 0xFFFF_FFFF_C001_2345).phys == 0x00212345


def test_4level_non_canonical_and_missing_levels():
    mem = Phys()
    assert isinstance(mem.walk(regs("4-level"), 0x0000_8000_0000_0000), PageFault)
    for missing in range(4):
        mem = Phys()
        map4(mem, 0x400000, 0x9000)
        tables = [0x1000, 0x2000, 0x3000, 0x4000]
        shift = (39, 30, 21, 12)[missing]
        mem.write(tables[missing] + ((0x400000 >> shift) & 0x1FF) * 8, 8, 0)
        assert mem.walk(regs("4-level"), 0x400000, write=True).error_code == PF_W


def test_4level_permissions_accumulate_over_levels():
    mem = Phys()
    map4(mem, 0x400000, 0x9000, leaf=P | RW | US, upper=P | US)   # an upper level is read-only
    assert mem.walk(regs("4-level"), 0x400000, write=True, user=True).error_code == PF_P | PF_W | PF_U
    mem = Phys()
    map4(mem, 0x400000, 0x9000, leaf=P | RW | US, upper=P | RW)   # an upper level is supervisor
    assert mem.walk(regs("4-level"), 0x400000, user=True).error_code == PF_P | PF_U


def test_4level_reserved_physical_bits_and_tables_outside_ram():
    mem = Phys()
    map4(mem, 0x400000, 0x9000 | (1 << 45))                     # above MAXPHYADDR (40)
    assert mem.walk(regs("4-level"), 0x400000).error_code & PF_RSVD
    mem = Phys(limit=0x3000)                                    # the PD lies outside "RAM"
    map4(mem, 0x400000, 0x9000)
    assert isinstance(mem.walk(regs("4-level"), 0x400000), PageFault)


# -- differential test against Unicorn's MMU ------------------------------------
ENTRY = 0x1000
DATA_VA = 0x40000000                    # 1 GiB: the page the guest touches


def _unicorn_access(leaf_flags, upper_flags, access, cpl3, wp, nxe):
    """Run one access in Unicorn (long mode) and report fault or value."""
    from unicorn import Uc, UC_ARCH_X86, UC_MODE_64, UC_HOOK_INTR
    from unicorn import x86_const as X
    from xenicorn.engine.rawctx import RawContext
    from xenicorn.x86.segments import flat_code64, flat_data
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0, 0x400000)
    mem = Phys()
    # identity map the first 2 MiB for code/tables (supervisor+user, rw, exec)
    mem.write(0x10000, 8, 0x11000 | P | RW | US)
    mem.write(0x11000, 8, 0x12000 | P | RW | US)
    mem.write(0x12000, 8, 0x0 | PS | P | RW | US)
    # the data page at 1 GiB -> physical 0x200000 via its own tables
    mem.write(0x11000 + 1 * 8, 8, 0x13000 | upper_flags)
    mem.write(0x13000, 8, 0x14000 | upper_flags)
    mem.write(0x14000, 8, 0x200000 | leaf_flags)
    for addr, byte in mem.mem.items():
        uc.mem_write(addr, bytes([byte]))
    uc.mem_write(0x200000, b"\xc3" + b"\x5a" * 15)              # ret, then data
    code = {"read": bytes.fromhex("8b0425" + "00000040") + b"\xf4",      # mov eax,[0x40000000]
            "write": bytes.fromhex("c70425" + "00000040" + "01000000") + b"\xf4",
            "fetch": bytes.fromhex("b800000040" "ffd0") + b"\xf4"}[access]  # mov eax,imm ; call rax
    uc.mem_write(ENTRY, code)
    uc.reg_write(X.UC_X86_REG_CR3, 0x10000)
    uc.reg_write(X.UC_X86_REG_CR4, CR4_PAE)
    uc.reg_write(X.UC_X86_REG_CR0, CR0_PG_PE | (CR0_WP if wp else 0))
    uc.msr_write(0xC0000080, 0x500 | (NXE if nxe else 0))
    if cpl3:
        with RawContext(uc) as ctx:
            ctx.load_segments(cs=flat_code64(0x33, 3), ss=flat_data(0x2B, 3))
    uc.reg_write(X.UC_X86_REG_RSP, 0x8000)
    seen = []

    def hook(uc, intno, _):
        seen.append((intno, RawContext(uc).error_code, uc.reg_read(X.UC_X86_REG_CR2)))
        uc.emu_stop()
    uc.hook_add(UC_HOOK_INTR, hook)
    uc.emu_start(ENTRY, ENTRY + 0x100, count=10)
    return seen[0] if seen else None


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(leaf=st.sampled_from([P, P | RW, P | US, P | RW | US, 0, P | RW | US | XD, P | US | XD]),
       upper=st.sampled_from([P | RW | US, P | US, P | RW]),
       access=st.sampled_from(["read", "write", "fetch"]),
       cpl3=st.booleans(), wp=st.booleans(), nxe=st.booleans())
def test_walker_agrees_with_unicorn_mmu(leaf, upper, access, cpl3, wp, nxe):
    if leaf & XD and not nxe:
        leaf &= ~XD                                   # reserved-bit case: covered by a unit test
    got = _unicorn_access(leaf, upper, access, cpl3, wp, nxe)
    mem = Phys()
    mem.write(0x10000, 8, 0x11000 | P | RW | US)
    mem.write(0x11000 + 8, 8, 0x13000 | upper)
    mem.write(0x13000, 8, 0x14000 | upper)
    mem.write(0x14000, 8, 0x200000 | leaf)
    r = PagingRegs(CR0_PG_PE | (CR0_WP if wp else 0), 0x10000, CR4_PAE, 0x500 | (NXE if nxe else 0))
    ours = translate(r, DATA_VA, mem.read, write=access == "write", user=cpl3, fetch=access == "fetch")
    if isinstance(ours, PageFault):
        assert got is not None and got[0] == 14, (ours, got)
        assert got[1] == ours.error_code and got[2] == DATA_VA
    else:
        assert got is None or got[0] != 14, (ours, got)
