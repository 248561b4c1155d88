"""The guided tour (docs/tour/) shows what its commands really print.

Each ``<!-- run: CMD -->`` block of every page is run (``tools/tour.py``,
the tool that writes them) and must equal the page's block, so a change
in the code's output makes the page's test fail until ``python
tools/tour.py`` regenerates it. The prose quotes trace lines in inline
code (``[irq] ...``, ``ok ...``); every such quote must still be found in one of the page's own
output blocks, so the explanations cannot drift from the output they
explain. The runs use ``--clock deterministic`` and repeat byte for byte.
"""
import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import tour  # noqa: E402

PAGES = tour.pages()
BLOCKS = [(os.path.basename(p), m["cmd"], m["body"]) for p in PAGES for m in tour.blocks(open(p).read())]
QUOTE = re.compile(r"`((?:\[(?:evtchn|irq|int|hypercalls|xenstore)\]|ok |== #)[^`]*)`")


def test_the_tour_has_its_pages_and_commands():
    names = [os.path.basename(p) for p in PAGES]
    assert names[:2] == ["01-gsi-callback.md", "02-stepper.md"] and "glossary.md" in names
    assert len(BLOCKS) >= 12
    # every command block is marked: a fenced block starting with "$ " has its run: comment
    for p in PAGES:
        text = open(p).read()
        assert text.count("```text\n$ ") == len(tour.blocks(text)), p
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert "docs/tour/README.md" in readme


@pytest.mark.parametrize("page,cmd,body", BLOCKS, ids=[f"{b[0]}:{i}" for i, b in enumerate(BLOCKS)])
def test_block_is_what_the_command_prints(page, cmd, body):
    fresh = tour.run(cmd)
    assert len(fresh.splitlines()) > 2, f"{cmd} printed almost nothing:\n{fresh}"
    assert "Traceback" not in fresh
    assert fresh == body, f"docs/tour/{page} is stale for `{cmd}`: run python tools/tour.py"


@pytest.mark.parametrize("path", PAGES, ids=[os.path.basename(p) for p in PAGES])
def test_quoted_lines_are_in_the_page_output(path):
    text = open(path).read()
    outputs = "".join(m["body"] for m in tour.blocks(text))
    prose = tour.BLOCK.sub("", text)
    missing = [q for q in QUOTE.findall(prose) if q not in outputs]
    assert not missing, f"{os.path.basename(path)} quotes lines its output no longer has: {missing}"
