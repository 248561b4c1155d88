#!/usr/bin/env python3
"""Build xenicorn's guest kernels from xenicorn/firmware/src with gcc and ld.

    python tools/build_firmware.py                 # all, into xenicorn/firmware/images
    python tools/build_firmware.py hello64 --out /tmp/fw

Each image is a freestanding ELF loaded at 1 MiB with the PVH entry note
(XEN_ELFNOTE_PHYS32_ENTRY). Builds are reproducible: the same sources and
toolchain give byte-identical images (no build IDs, no paths, no dates), so
CI can check the committed images against a rebuild.

"The same toolchain" matters: another gcc schedules and allocates registers
differently, another binutils (ld, and the assembler gcc runs) may encode or
lay out sections differently, and the image still works but is not the
same bytes. A build into the committed ``images/`` therefore records which
gcc and ld made them, the first line of their ``--version``, in
``images/TOOLCHAIN.json``; the byte-identical test compares bytes only when
the local gcc and ld print the same lines, and skips naming both otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(ROOT, "xenicorn", "firmware", "src")
IMAGES = os.path.join(ROOT, "xenicorn", "firmware", "images")
TOOLCHAIN = os.path.join(IMAGES, "TOOLCHAIN.json")

LIB = ["lib/desc.c", "lib/console.c", "lib/report.c", "lib/xen.c", "lib/xen_hcall.S"]

# name -> (bits, sources, uses the C library: True with the PVH entry, "multiboot" with its own)
KERNELS: dict[str, tuple[int, list[str], bool]] = {
    "hello32": (32, ["hello/hello.c"], True),
    "hello64": (64, ["hello/hello.c"], True),
    "exceptions32": (32, ["exceptions/exceptions.c", "lib/user.c"], True),
    "exceptions64": (64, ["exceptions/exceptions.c", "lib/user.c"], True),
    "fep32": (32, ["fep/fep.c", "lib/user.c"], True),
    "fep64": (64, ["fep/fep.c", "lib/user.c"], True),
    "memseg32": (32, ["memseg/memseg.c", "lib/user.c"], True),
    "memseg64": (64, ["memseg/memseg.c", "lib/user.c"], True),
    "crcheck32": (32, ["crcheck/crcheck.c"], True),
    "crcheck64": (64, ["crcheck/crcheck.c"], True),
    "syscall64": (64, ["syscall64/syscall64.c", "syscall64/entry.S"], True),
    "xencore32": (32, ["xencore/xencore.c", "lib/user.c"], True),
    "xencore64": (64, ["xencore/xencore.c", "lib/user.c"], True),
    "irq32": (32, ["irq/irq.c"], True),
    "irq64": (64, ["irq/irq.c"], True),
    "hcbench32": (32, ["hcbench/hcbench.c"], True),
    "hcbench64": (64, ["hcbench/hcbench.c"], True),
    "evtchn32": (32, ["evtchn/evtchn.c"], True),
    "evtchn64": (64, ["evtchn/evtchn.c"], True),
    "fifo32": (32, ["fifo/fifo.c"], True),
    "fifo64": (64, ["fifo/fifo.c"], True),
    "xenstore32": (32, ["xenstore/xenstore.c"], True),
    "xenstore64": (64, ["xenstore/xenstore.c"], True),
    "gnttab32": (32, ["gnttab/gnttab.c"], True),
    "gnttab64": (64, ["gnttab/gnttab.c"], True),
    "xenabi32": (32, ["xenabi/xenabi.c"], True),
    "xenabi64": (64, ["xenabi/xenabi.c"], True),
    "tickbench32": (32, ["tickbench/tickbench.c"], True),
    "tickbench64": (64, ["tickbench/tickbench.c"], True),
    "smp32": (32, ["smp/smp.c", "smp/madt.c", "smp/smpxen.c", "smp/entry.S", "lib/acpi.c"], True),
    "smp64": (64, ["smp/smp.c", "smp/madt.c", "smp/smpxen.c", "smp/entry.S", "lib/acpi.c"], True),
    "hpet32": (32, ["hpet/hpet.c", "lib/acpi.c"], True),
    "hpet64": (64, ["hpet/hpet.c", "lib/acpi.c"], True),
    "cpuidfault32": (32, ["cpuidfault/cpuidfault.c", "lib/user.c"], True),
    "cpuidfault64": (64, ["cpuidfault/cpuidfault.c", "lib/user.c"], True),
    "wild32": (32, ["misbehave/wild32.S"], False),
    "triple32": (32, ["misbehave/triple32.S"], False),
    "spin32": (32, ["misbehave/spin32.S"], False),
    "mboot32": (32, ["multiboot/mboot.c"], "multiboot"),
    "vm86_32": (32, ["vm86/vm86.c"], True),
    "taskgate32": (32, ["taskgate/taskgate.c"], True),
    "taskgate64": (64, ["taskgate/taskgate.c"], True),
    "nmi32": (32, ["nmi/nmi.c"], True),
    "nmi64": (64, ["nmi/nmi.c"], True),
    "apicoff32": (32, ["apicoff/apicoff.c"], True),
    "apicoff64": (64, ["apicoff/apicoff.c"], True),
    "umip32": (32, ["umip/umip.c", "lib/user.c"], True),
    "umip64": (64, ["umip/umip.c", "lib/user.c"], True),
    "cpufeat32": (32, ["cpufeat/cpufeat.c"], True),
    "cpufeat64": (64, ["cpufeat/cpufeat.c"], True),
}

CFLAGS = ["-ffreestanding", "-nostdlib", "-fno-pic", "-fno-pie", "-fno-stack-protector",
          "-fno-asynchronous-unwind-tables", "-fno-unwind-tables", "-mno-red-zone",
          "-mgeneral-regs-only", "-O2", "-g0", "-Wall", "-Wextra", "-Wno-unused-parameter",
          "-fno-builtin", "-fno-common", f"-ffile-prefix-map={ROOT}=."]


def _run(cmd: list[str]) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        sys.stderr.write(" ".join(cmd) + "\n" + res.stdout + res.stderr)
        raise SystemExit(f"build_firmware: {cmd[0]} failed")


def toolchain() -> dict[str, str]:
    """The local gcc and ld, as the first line of their ``--version``.

    That line carries the version and the distribution's patch level, e.g.
    "gcc (Debian 12.2.0-14+deb12u1) 12.2.0"; LC_ALL=C keeps it untranslated.
    """
    env = dict(os.environ, LC_ALL="C")
    found = {}
    for tool in ("gcc", "ld"):
        try:
            res = subprocess.run([tool, "--version"], capture_output=True, text=True, env=env)
        except OSError:
            found[tool] = "none"
            continue
        found[tool] = res.stdout.splitlines()[0].strip() if res.returncode == 0 and res.stdout else "unknown"
    return found


def recorded_toolchain(path: str = TOOLCHAIN) -> dict[str, str] | None:
    """The gcc and ld that built the committed images, or None if not recorded (or unreadable)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), str) for k in ("gcc", "ld")):
        return None
    return {"gcc": data["gcc"], "ld": data["ld"]}


def mismatch(recorded: dict[str, str] | None, local: dict[str, str]) -> str | None:
    """Why images built with ``recorded`` need not match a build with ``local`` byte for byte, or None."""
    if recorded is None:
        return f"{TOOLCHAIN} does not say which gcc and ld built the images"
    if recorded != local:
        return (f"the images were built with {recorded['gcc']} and {recorded['ld']}; "
                f"this host has {local['gcc']} and {local['ld']}")
    return None


def build(name: str, out_dir: str, objects: dict | None = None) -> str:
    """Build one kernel into ``out_dir``.

    ``objects`` caches compiled sources by (source, word size, place) across calls:
    the library is the same object in every kernel of one width, so a full
    build compiles it twice, not once per kernel. Object files do not
    depend on which kernel asked for them, so the images are the same bytes.
    """
    bits, sources, with_lib = KERNELS[name]
    arch = ["-m32", "-march=i686"] if bits == 32 else ["-m64"]
    srcs = list(sources)
    if with_lib == "multiboot":
        # no PVH note, so the loader must choose multiboot by the header
        srcs = ["multiboot/start.S", "lib/isr.S"] + LIB + srcs
    elif with_lib:
        lib = [s for s in LIB if os.path.exists(os.path.join(SRC, s))]
        srcs = ["lib/pvh_note.S", f"lib/start{bits}.S", "lib/isr.S"] + lib + srcs
    else:
        srcs = ["lib/pvh_note.S"] + srcs
    own = objects is None
    cache_dir = tempfile.mkdtemp() if own else objects.setdefault("dir", tempfile.mkdtemp())
    objects = {} if own else objects
    try:
        objs = []
        for i, src in enumerate(srcs):
            # An assembled object's name becomes its file symbol: keep "NN.o", the
            # source's place in the link, whichever kernel compiled it first.
            key = (src, bits, i)
            if key not in objects:
                sub = os.path.join(cache_dir, str(len(objects)))
                os.mkdir(sub)
                obj = os.path.join(sub, f"{i:02d}.o")
                _run(["gcc", *arch, *CFLAGS, "-c", os.path.join(SRC, src), "-o", obj])
                objects[key] = obj
            objs.append(objects[key])
        out = os.path.join(out_dir, f"{name}.elf")
        _run(["ld", "-m", "elf_i386" if bits == 32 else "elf_x86_64", "-nostdlib", "--build-id=none",
              "-z", "noexecstack", "-z", "max-page-size=4096", "--no-warn-rwx-segments",
              "-T", os.path.join(SRC, "lib/link.ld"), *objs, "-o", out])
    finally:
        if own:
            shutil.rmtree(cache_dir, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", help=f"kernels to build (default all: {', '.join(KERNELS)})")
    p.add_argument("--out", default=IMAGES, help="output directory")
    args = p.parse_args(argv)
    for tool in ("gcc", "ld"):
        if shutil.which(tool) is None:
            print(f"build_firmware: {tool} not found", file=sys.stderr)
            return 2
    names = args.names or list(KERNELS)
    unknown = [n for n in names if n not in KERNELS]
    if unknown:
        print(f"build_firmware: unknown kernel(s): {', '.join(unknown)}", file=sys.stderr)
        return 2
    into_images = os.path.realpath(args.out) == os.path.realpath(IMAGES)
    local = toolchain()
    if into_images and set(names) != set(KERNELS):
        # TOOLCHAIN.json names one toolchain for all images: a partial rebuild must not make it lie
        why = mismatch(recorded_toolchain(), local)
        if why:
            print(f"build_firmware: {why}: rebuild all of them, not a few", file=sys.stderr)
            return 2
    os.makedirs(args.out, exist_ok=True)
    objects: dict = {}
    try:
        for name in names:
            if not all(os.path.exists(os.path.join(SRC, s)) for s in KERNELS[name][1]):
                continue                      # sources not written yet
            print(build(name, args.out, objects))
    finally:
        if "dir" in objects:
            shutil.rmtree(objects["dir"], ignore_errors=True)
    if into_images:
        with open(TOOLCHAIN, "w") as f:
            json.dump(local, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
