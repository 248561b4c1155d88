"""Regenerate (or check) every command output shown in the guided tour, docs/tour/*.md.

A page marks a command whose output it shows with an HTML comment, and the
fenced block right after it holds ``$ COMMAND`` and the output:

    <!-- run: xenicorn run hello64 --clock deterministic -->
    ```text
    $ xenicorn run hello64 --clock deterministic
    ...what it printed...
    ```

``python tools/tour.py`` runs every marked command (bash, from the
repository's root, stdout and stderr merged as a terminal shows them, with
``xenicorn`` being this checkout's code) and rewrites the blocks;
``--check`` only compares and lists the stale blocks (exit 1).
``tests/test_tour.py`` runs the same check, so the tour never goes stale.
Commands use ``--clock deterministic``: guest time is counted in
instructions, so a run repeats byte for byte. The only normalisation is
trailing whitespace at line ends (Markdown tools strip it).
"""
from __future__ import annotations

import argparse
import atexit
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOUR = os.path.join(ROOT, "docs", "tour")
BLOCK = re.compile(r"<!-- run: (?P<cmd>.+?) -->\n```(?P<lang>\w*)\n(?P<body>.*?)```\n", re.S)


def pages() -> list[str]:
    return sorted(os.path.join(TOUR, f) for f in os.listdir(TOUR) if f.endswith(".md"))


def blocks(text: str) -> list[re.Match]:
    return list(BLOCK.finditer(text))


def _shim_dir() -> str:
    """A directory with a ``xenicorn`` that runs this checkout (not whatever is installed)."""
    d = tempfile.mkdtemp(prefix="xenicorn-tour-")
    atexit.register(shutil.rmtree, d, ignore_errors=True)
    path = os.path.join(d, "xenicorn")
    with open(path, "w") as f:
        f.write(f'#!/bin/sh\nPYTHONPATH="{ROOT}" exec "{sys.executable}" -m xenicorn "$@"\n')
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return d


_SHIM: str | None = None


def run(cmd: str, timeout: float = 300) -> str:
    """What ``cmd`` prints, as the page shows it: ``$ cmd`` and the merged output."""
    global _SHIM
    if _SHIM is None:
        _SHIM = _shim_dir()
    env = dict(os.environ, PATH=_SHIM + os.pathsep + os.environ.get("PATH", ""), COLUMNS="100")
    r = subprocess.run(["bash", "-c", cmd + " 2>&1"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=timeout, stdin=subprocess.DEVNULL)
    out = r.stdout
    lines = [ln.rstrip() for ln in out.splitlines()]
    return "\n".join([f"$ {cmd}"] + lines) + "\n"


def regenerate(path: str, check: bool = False) -> list[str]:
    """Rewrite the page's blocks (or, with ``check``, only report): the commands whose block was stale."""
    with open(path) as f:
        text = f.read()
    stale = []
    parts, last = [], 0
    for m in blocks(text):
        fresh = run(m["cmd"])
        if fresh != m["body"]:
            stale.append(m["cmd"])
        parts.append(text[last:m.start("body")])
        parts.append(fresh)
        last = m.end("body")
    parts.append(text[last:])
    new = "".join(parts)
    if not check and new != text:
        with open(path, "w") as f:
            f.write(new)
    return stale


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="compare only; exit 1 if a block is stale")
    p.add_argument("pages", nargs="*", help="pages to do (default: every docs/tour/*.md)")
    args = p.parse_args(argv)
    bad = 0
    for path in args.pages or pages():
        stale = regenerate(path, check=args.check)
        for cmd in stale:
            print(f"{os.path.relpath(path, ROOT)}: {'stale' if args.check else 'updated'}: {cmd}")
        bad += len(stale)
    return 1 if args.check and bad else 0


if __name__ == "__main__":
    sys.exit(main())
