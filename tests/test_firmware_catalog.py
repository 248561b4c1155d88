"""The bundled kernels' descriptions: one table (xenicorn/firmware/catalog.py) for the CLI and the README."""
import pathlib
import subprocess
import sys

from test_firmware import build_tool
from xenicorn import firmware
from xenicorn.firmware import catalog

build_firmware = build_tool()

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_every_image_has_one_row_and_every_row_names_images():
    listed = [n for k in catalog.KERNELS for n in k.names]
    assert len(listed) == len(set(listed))
    assert sorted(listed) == firmware.names() == sorted(build_firmware.KERNELS)
    for k in catalog.KERNELS:
        assert k.text.strip() and "\n" not in k.text, k.names
        # the source folders are the ones tools/build_firmware.py compiles the images from
        own = {s.split("/")[0] for n in k.names for s in build_firmware.KERNELS[n][1]} - {"lib"}  # lib: every kernel
        assert set(k.sources) == own, k.names
        assert all((pathlib.Path(firmware.__file__).parent / "src" / d).is_dir() for d in k.sources)


def test_the_readme_table_is_the_catalog():
    text = README.read_text()
    assert catalog.markdown_table() in text, (
        "README.md's 'Bundled guest kernels' table differs from xenicorn/firmware/catalog.py: "
        "paste the output of `python -m xenicorn.firmware.catalog`")


def test_xenicorn_firmware_lists_each_image_with_its_source_and_what_it_shows():
    out = subprocess.run([sys.executable, "-m", "xenicorn", "firmware"], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out[0].startswith("images in ")
    rows = {line.split()[0]: line for line in out[1:]}
    assert sorted(rows) == firmware.names()
    for name, line in rows.items():
        k = catalog.describe(name)
        assert len(line) <= 120, line
        assert line.split()[1] == ",".join(f"src/{d}/" for d in k.sources)
        assert line.endswith(catalog.summary(k.text, 88))
    assert rows["evtchn64"].split(None, 2)[2].startswith("event channels through the callback chosen by --append")
    assert catalog.summary("a `b` c") == "a b c" and catalog.summary("x " * 80, 20) == "x x x x x x x x..."
