"""What every benchmark script shares: its command line and its output."""
from __future__ import annotations

import argparse
import json


def main(doc: str, measure, quick: tuple, full: tuple, header: str, row, argv=None) -> int:
    """``--quick`` runs ``measure(*quick)``, else ``measure(*full)``; ``--json`` prints raw results."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a short smoke run")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    res = measure(*(quick if args.quick else full))
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print(header)
    for key, r in res.items():
        print(row(key, r))
    return 0
