"""The regression gate: compare the ratios two pytest-benchmark runs saved, not their times.

pytest-benchmark 5.3's `--benchmark-compare-fail` only compares timing stats (min, max, mean, median,
...), which move with the machine's load; the ratios in `extra_info` (ours / an in-run calibration
kernel; for the zoo, fastcore's default / Keras fit at its best in the same rounds) do not. Usage:

    python bench/compare.py                 # the two newest runs under .benchmarks/
    python bench/compare.py BASE.json NEW.json [--tolerance 0.2]
    python bench/compare.py RUN.json        # print one run's table

Exit 1 when any benchmark's gated ratio fell by more than the tolerance (default 20%: back-to-back
runs on this shared 2-core machine moved by up to ~10%).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

# a benchmark's gated ratio: the first of these it records (the zoo's MLPs also record a ceiling_share, not gated)
GATED = ("ratio_vs_keras_best", "ceiling_share")
RATES = ("examples_per_sec", "rows_per_sec")   # training cases / the ingest case
COLUMNS = ("examples_per_sec", "rows_per_sec", "ceiling_share", "utilisation", "ratio_vs_fit", "ratio_vs_eager",
           "ratio_vs_keras_best", "ratio_vs_jax", "input_wait_share", "compile_seconds")


def load(path: str) -> dict[str, dict]:
    with open(path) as f:
        return {b["name"]: b["extra_info"] for b in json.load(f)["benchmarks"]}


def newest(count: int) -> list[str]:
    runs = sorted(glob.glob(os.path.join(".benchmarks", "*", "*.json")), key=os.path.getmtime)
    if len(runs) < count:
        sys.exit(f"compare: need {count} saved runs under .benchmarks/, found {len(runs)}: "
                 f"run `pytest bench/ --benchmark-autosave` first")
    return runs[-count:]


def table(run: dict[str, dict]) -> list[str]:
    rows = [f"{'benchmark':<44} " + " ".join(f"{c:>16}" for c in COLUMNS)]
    for name, info in run.items():
        cells = [f"{info[c]:>16,.0f}" if c in RATES and c in info else f"{info[c]:>16.3f}" if c in info else f"{'':>16}"
                 for c in COLUMNS]
        rows.append(f"{name:<44} " + " ".join(cells))
    return rows


def regressions(base: dict[str, dict], new: dict[str, dict], tolerance: float) -> list[str]:
    """One line per benchmark in both runs whose gated ratio fell by more than `tolerance`."""
    found = []
    for name in sorted(base.keys() & new.keys()):
        gated = next((g for g in GATED if g in base[name]), GATED[0])
        before, after = base[name].get(gated), new[name].get(gated)
        if before and after is not None and after < before * (1 - tolerance):
            rate = next(r for r in RATES if r in new[name])
            found.append(f"REGRESSION {name}: {gated} {before:.3f} -> {after:.3f} ({after / before - 1:+.0%}), "
                         f"{rate.replace('_per_sec', '/s')} {base[name].get(rate, 0):,.0f} -> {new[name][rate]:,.0f}")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", help="pytest-benchmark JSON files (default: the two newest saved)")
    parser.add_argument("--tolerance", type=float, default=0.2)
    args = parser.parse_args(argv)
    if len(args.runs) == 1:
        print("\n".join(table(load(args.runs[0]))))
        return 0
    base_path, new_path = args.runs if len(args.runs) == 2 else newest(2)
    base, new = load(base_path), load(new_path)
    print(f"base {base_path}\nnew  {new_path}")
    print("\n".join(table(new)))
    found = regressions(base, new, args.tolerance)
    print("\n".join(found) or f"no {' or '.join(GATED)} fell by more than {args.tolerance:.0%} "
                              f"({len(base.keys() & new.keys())} benchmarks compared)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
