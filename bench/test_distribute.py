"""Examples/s of the HIGGS MLP (float32, XLA, batch 500) on one device, under tf.distribute, side by side.

Four cases, each a fresh CLI process (logical devices must be set before TensorFlow starts), run back to
back in one session so their ratios compare like with like; each ratio is to the single-device case:
  single      the plain path: the whole step, update included, in one XLA function
  mirrored-1  MirroredStrategy on ONE device: the distributed structure alone (strategy.run, the update
              outside XLA in the outer graph, the all-reduced finiteness sum) with nothing to communicate
  mirrored-2  2 logical CPU devices: each replica half the batch, an all-reduce between them
  workers-2   2 processes on loopback (MultiWorkerMirroredStrategy): a gRPC ring all-reduce per step
So the overhead is named by the ratio in which it appears: structure = mirrored-1 / single, splitting
= mirrored-2 / mirrored-1, processes and loopback = workers-2 / mirrored-2. On a 2-core machine every
replica shares the same two cores, so distribution cannot be faster here; the figures state its cost.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT

EPOCHS = 12
CASES = {
    "single": ["--strategy", "none"],
    "mirrored-1": ["--strategy", "mirrored", "--devices", "1"],
    "mirrored-2": ["--strategy", "mirrored", "--devices", "2"],
    "workers-2": [],
}
FIGURES: dict[str, float] = {}


def run_case(name: str, data_dir: str, logdir: str) -> dict:
    args = ["--dataset", "higgs", "--data-dir", data_dir, "--precision", "float32", "--xla", "--epochs", str(EPOCHS),
            "--logdir", logdir, "--run-name", name, "--no-preflight", "--threads", "all"]   # like with like
    head = ([sys.executable, "-m", "fastcore.launch", "--workers", "2", "--"] if name == "workers-2"
            else [sys.executable, "-m", "fastcore.train"])
    done = subprocess.run([*head, *args, *CASES[name]], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    with open(f"{logdir}/{name}/summary.json") as f:
        return json.load(f)


@pytest.mark.parametrize("name", list(CASES))
def test_distributed_throughput(benchmark, data_dir, tmp_path, name):
    summary = benchmark.pedantic(run_case, args=(name, data_dir, str(tmp_path)), rounds=1, iterations=1)
    FIGURES[name] = summary["examples_per_sec"]
    info = {"examples_per_sec": summary["examples_per_sec"], "step_time_ms": summary["step_time_ms"],
            "strategy": summary.get("strategy", "one device"), "replica_spread": summary.get("replica_spread")}
    if "single" in FIGURES:
        info["ratio_vs_single"] = summary["examples_per_sec"] / FIGURES["single"]
    benchmark.extra_info.update(info)
    print(f"\n{name}: {summary['examples_per_sec']:,.0f} ex/s" +
          (f" ({info['ratio_vs_single']:.2f}x single)" if "ratio_vs_single" in info else ""))
    assert summary.get("replica_spread", 0.0) == 0.0
