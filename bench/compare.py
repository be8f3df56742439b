"""Compare two result folders of bench/overhead.py, figure by figure.

    python -m bench.compare bench/results/A bench/results/B

Prints every figure both runs have: median in A, median in B, and B/A.
Runs on different days or machines differ by more than noise; compare the
ratios against `sidecar` within each run (report.md) before raw figures.
"""

from __future__ import annotations

import json
import os
import sys


def _key(f) -> tuple:
    return (f["scenario"], f.get("pair") or f"{f.get('pods_per_node')} pods", f["mode"],
            f.get("conns") or "", f["field"])  # fmt: skip


def load(d: str) -> dict:
    path = d if d.endswith(".json") else os.path.join(d, "results.json")
    with open(path) as f:
        doc = json.load(f)
    return {_key(f): f for f in doc["figures"]}, doc


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    (a, da), (b, db) = load(argv[0]), load(argv[1])
    print(f"A: {argv[0]} ({da['machine']['dabbawala']}, {da['started']})")
    print(f"B: {argv[1]} ({db['machine']['dabbawala']}, {db['started']})\n")
    print(f"{'scenario':<9} {'pair':<11} {'mode':<12} {'conns':>5} {'field':<22} "
          f"{'A':>11} {'B':>11} {'B/A':>7}")  # fmt: skip
    for k in sorted(set(a) & set(b), key=str):
        x, y = a[k]["median"], b[k]["median"]
        if x is None or y is None:
            continue
        ratio = f"{y / x:.2f}x" if x else "-"
        print(f"{k[0]:<9} {k[1]:<11} {k[2]:<12} {k[3]!s:>5} {k[4]:<22} {x:>11.3f} {y:>11.3f} "
              f"{ratio:>7}")  # fmt: skip
    only = sorted(set(a) ^ set(b), key=str)
    if only:
        print(f"\n{len(only)} figure(s) in one run only")
    return 0


if __name__ == "__main__":
    sys.exit(main())
