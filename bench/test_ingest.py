"""HIGGS ingest: a CSV.gz in the real UCI format (`%.18e`, ~730 bytes a row) to float32 rows.

The file is written once by ../shared/tools/make_higgs.py into .benchmarks/data/ (never committed);
FASTCORE_BENCH_HIGGS_ROWS sets its size (default 1,000,000 rows; the full file is 11,000,000, about
6 minutes to write). Each round times the ingest (`pipelines.csvrows.iter_rows`: isal inflate on one
thread, pyarrow parse on a pool) and, side by side, inflating the same file alone with isal. One gzip
stream inflates serially, so the inflate-alone rate bounds the ingest: ceiling_share = ingest / inflate
(the gated ratio) can never pass 1. extra_info: rows_per_sec, inflate_rows_per_sec, ceiling_share.
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

import pytest
from isal import isal_zlib

from conftest import ROOT
from pipelines import csvrows

ROUNDS = 3
ROWS = int(os.environ.get("FASTCORE_BENCH_HIGGS_ROWS", "1000000"))
SMOKE_ROWS = 20_000


def real_format_file(rows: int) -> str:
    path = ROOT / ".benchmarks" / "data" / f"HIGGS-{rows}.csv.gz"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tool = ROOT.parent / "shared" / "tools" / "make_higgs.py"
        subprocess.run([sys.executable, str(tool), str(path), "--rows", str(rows)], check=True)
    return str(path)


def ingest(path: str) -> tuple[float, int]:
    """(rows/s, rows) of the whole ingest: inflate, parse, row-major float32."""
    start = time.perf_counter()
    rows = sum(len(block) for block in csvrows.iter_rows(path, 29, (0.0, 1.0)))
    return rows / (time.perf_counter() - start), rows


def inflate_alone(path: str, rows: int) -> float:
    start = time.perf_counter()
    inflate = isal_zlib.decompressobj(16 + isal_zlib.MAX_WBITS)
    with open(path, "rb") as f:
        while raw := f.read(1 << 20):
            inflate.decompress(raw)
    return rows / (time.perf_counter() - start)


@pytest.mark.parametrize("rows", [ROWS, pytest.param(SMOKE_ROWS, marks=pytest.mark.smoke, id="smoke")])
def test_higgs_ingest(benchmark, request, rows):
    path = real_format_file(rows)
    rates, bounds = [], []

    def round_():
        rate, parsed = ingest(path)
        assert parsed == rows
        rates.append(rate)
        bounds.append(inflate_alone(path, rows))

    benchmark.pedantic(round_, rounds=1 if request.node.get_closest_marker("smoke") else ROUNDS)
    rate, bound = statistics.median(rates), statistics.median(bounds)
    benchmark.extra_info.update(task="higgs-ingest", rows=rows, rows_per_sec=rate, inflate_rows_per_sec=bound,
                                ceiling_share=rate / bound, file_bytes=os.path.getsize(path))
