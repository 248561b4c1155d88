"""The engine's start-up check: is this the Unicorn whose private layout we know?

xenicorn reaches into Unicorn beyond its public API: offsets in QEMU's
``CPUX86State`` (:mod:`rawctx`), fields of ``uc_struct`` (:mod:`stopcheck`,
:mod:`icount`), ``CPUState.interrupt_request`` (:mod:`irqwindow`), the SVM
intercept fields (:mod:`msr`). Each offset was measured on one build, the
PyPI wheel of unicorn 2.1.4 on x86-64 Linux, and each module carries a
self-test that checks its offsets by *behaviour* (run a few instructions,
look where the effect landed). :func:`probe` runs all of them once per
process, before a machine is built:

=========================  ==============================================
check                      what a failure would have corrupted
=========================  ==============================================
unicorn version            every offset below (refused unless 2.1.4)
host OS and architecture   glibc's ``sigjmp_buf`` size (stopcheck), the
                           64-bit pointers of every ctypes read
rawctx.selftest            segment caches, error code, ``old_exception``
LiveContext lookup         ``CPUState.env_ptr`` (exceptions handled in place)
icount counter             instruction counts, deterministic time
stopcheck (flag, soft     stops that replay a memory access, RIP left at
stop, cpu_exit fields,     an old value after a stop, system calls skipped
skip_sync)                 by a stop from another thread
msr.selftest               the MSR intercept (hypercall page, TSC deadline)
hooks.binding_selftest     the binding's private callback dicts, which keep
                           deleted hooks' thunks alive (a crash otherwise)
rawctx.feature_selftest    the engine CPU's feature words and XCR0 (run
                           only when a ``--cpu`` model other than
                           ``default`` is built: cpufeatures.new_engine)
irqwindow.available        nothing: a failure only falls back to a block
                           hook for the interrupt window (~14x slower
                           while it is armed), and NMIs are then not
                           blocked until IRET; said once on stderr
=========================  ==============================================

A failure raises :class:`EngineUnsupported`, the one error class of the
engine's layout checks (the modules' own ``UnsupportedUnicornBuild``,
``FlagNotFound`` and ``CounterNotFound`` are its subclasses). The command
line prints it as one line and exits with status 2, as for any input it
cannot use. The result is cached; :func:`reset_probe` forgets it (tests fake a
failure, then restore).
"""
from __future__ import annotations

import platform
import struct
import sys
from dataclasses import dataclass

SUPPORTED_UNICORN = "2.1.4"
SUPPORTED_HOSTS = frozenset({("linux", "x86_64")})
WINDOW_FALLBACK_NOTE = ("xenicorn: note: this Unicorn build gives no exact interrupt-window exit; "
                        "using a block hook instead (guest code runs ~14x slower while an interrupt "
                        "waits for IF=1)")


class EngineUnsupported(RuntimeError):
    """This host or Unicorn build is not one whose private layout the engine knows."""


@dataclass(frozen=True)
class EngineInfo:
    """What :func:`probe` found: the build, the host, and which fast paths work."""

    unicorn_version: str
    host: str                          # "linux x86_64"
    interrupt_window_exits: bool       # exact window exit (irqwindow), else the block-hook fallback


_info: EngineInfo | None = None
_notes_said: set[str] = set()


def note_once(text: str) -> None:
    """Print ``text`` on stderr the first time it is asked for in this process."""
    if text not in _notes_said:
        _notes_said.add(text)
        print(text, file=sys.stderr)


def _host() -> tuple[str, str]:
    return sys.platform, platform.machine()


def _check_version() -> str:
    try:
        import unicorn
    except ImportError as exc:
        raise EngineUnsupported(f"the unicorn package cannot be imported ({exc}); "
                                f"pip install unicorn=={SUPPORTED_UNICORN}") from None
    binding = getattr(unicorn, "__version__", "unknown")
    if binding != SUPPORTED_UNICORN:
        raise EngineUnsupported(f"unicorn {binding} is installed, but xenicorn knows the private layout of "
                                f"unicorn {SUPPORTED_UNICORN} only (pip install unicorn=={SUPPORTED_UNICORN})")
    major, minor, combined = unicorn.uc_version()
    library = f"{combined >> 24}.{(combined >> 16) & 0xFF}.{(combined >> 8) & 0xFF}"
    if library != SUPPORTED_UNICORN:
        raise EngineUnsupported(f"the unicorn {binding} binding loaded a {library} engine library; "
                                f"xenicorn knows unicorn {SUPPORTED_UNICORN}'s only")
    return binding


def _check_host() -> str:
    os_name, arch = _host()
    pointer_bits = struct.calcsize("P") * 8
    if (os_name, arch) not in SUPPORTED_HOSTS or pointer_bits != 64:
        raise EngineUnsupported(f"host {os_name} {arch} ({pointer_bits}-bit Python): the engine's private "
                                "offsets are known for 64-bit Python on x86_64 Linux only")
    return f"{os_name} {arch}"


def _self_tests() -> None:
    """Every layout self-test; anything unexpected inside one is a failed check too."""
    from . import hooks, icount, msr, rawctx, stopcheck
    checks = (
        ("callback keeping (hooks)", hooks.binding_selftest),
        ("CPU state layout (rawctx)", rawctx.selftest),
        ("CPUState.env_ptr (LiveContext)", rawctx.env_ptr_offset),
        ("instruction counter (icount)", icount.counter_offset),
        ("cpu_exit fields (stopcheck)", stopcheck.cpu_exit_fields),
        ("stop between blocks (stopcheck)", stopcheck.soft_stop_selftest),
        ("MSR intercept window (msr)", msr.selftest),
    )
    for what, check in checks:
        try:
            check()
        except EngineUnsupported:
            raise
        except Exception as exc:            # noqa: BLE001 - a layout we do not know, said in one line
            kind = type(exc).__qualname__
            if type(exc).__module__ != "builtins":
                kind = f"{type(exc).__module__}.{kind}"
            raise EngineUnsupported(f"{what} self-test failed on this Unicorn build: {kind}: {exc}") from exc


def probe() -> EngineInfo:
    """Check the engine once per process; raise :class:`EngineUnsupported` if it is not the known one."""
    global _info
    if _info is None:
        version = _check_version()
        host = _check_host()
        _self_tests()
        from . import irqwindow
        exact = irqwindow.available()
        if not exact:
            note_once(WINDOW_FALLBACK_NOTE)
        _info = EngineInfo(version, host, exact)
    return _info


def reset_probe() -> None:
    """Forget the cached result and the self-tests' caches (for tests that fake a failure)."""
    global _info
    from . import hooks, icount, irqwindow, msr, rawctx, stopcheck
    _info = None
    _notes_said.clear()
    for cached in (rawctx.selftest, rawctx.env_ptr_offset, rawctx.feature_words_offset, rawctx.feature_selftest,
                   msr.selftest, stopcheck.soft_stop_selftest,
                   stopcheck.cpu_exit_fields,
                   irqwindow.available, hooks.binding_selftest):
        getattr(cached, "cache_clear", lambda: None)()      # a test may have replaced one
    icount.forget_offset()
    stopcheck.forget_offset()
