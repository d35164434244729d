"""Throughput per task and mode, with Keras `fit` on the same model and batches as the yardstick.

Each benchmark stores its figures in `extra_info`: examples_per_sec (median over rounds),
ceiling_share (achieved FLOP/s / the in-run XLA float32 matmul kernel: the gated ratio, which follows
the machine's load), utilisation (achieved FLOP/s / the honest peak of the case's dtype: the best of
XLA and oneDNN matmuls, fastcore.observe.calibrate, never above 1), mode (the path that ran: auto may
run bfloat16 as a plain graph),
ratio_vs_fit (/ Keras fit at its best steps_per_execution, same session), ratio_vs_eager, and,
for K-step XLA cases, input_wait_share (1 - streamed / the same step on one reused batch).
pytest-benchmark's own timings are of one round (Ours) or of the whole measurement (fit).
"""
from __future__ import annotations

import pytest

import harness
from fastcore.engine import report
from fastcore.observe import tensorboard

ROUNDS, ROUND_SECONDS = 7, 0.5
FIT_SPE = {"fashion_mnist": (1, 50), "higgs": (1, 20)}
FLAGS = {"fashion_mnist": {}, "higgs": {}}
CASES = [  # task, mode, precision, steps per call
    ("fashion_mnist", "eager", "float32", 1),
    ("fashion_mnist", "graph", "float32", 1),
    ("fashion_mnist", "xla", "float32", 1),
    ("fashion_mnist", "graph", "float32", 50),
    ("fashion_mnist", "xla", "float32", 50),
    ("fashion_mnist", "xla", "bfloat16", 50),
    ("higgs", "eager", "float32", 1),
    ("higgs", "graph", "float32", 1),
    ("higgs", "xla", "float32", 1),
    ("higgs", "graph", "float32", 20),
    ("higgs", "xla", "float32", 20),
    ("higgs", "graph", "bfloat16", 20),
    ("higgs", "xla", "bfloat16", 20),
    ("higgs", "xla", "auto", 20),
]
SMOKE = {"higgs": {"train_split": "train[:2000]", "eval_split": "train[2000:2500]", "batch_size": 100}}


def _id(case):
    return "-".join(map(str, case))


def _sizes(request):
    return (2, 0.05) if request.node.get_closest_marker("smoke") else (ROUNDS, ROUND_SECONDS)


def fit_best(task, measured):
    figures = {spe: measured[(task, f"fit-spe{spe}")] for spe in FIT_SPE[task] if (task, f"fit-spe{spe}") in measured}
    return max(figures.values()) if figures else None


@pytest.mark.parametrize("task,spe", [(t, s) for t, spes in FIT_SPE.items() for s in spes] +
                         [pytest.param("higgs", 4, marks=pytest.mark.smoke, id="smoke-higgs-4")])
def test_keras_fit(benchmark, request, data_dir, kernel, measured, task, spe):
    rounds, seconds = _sizes(request)
    flags = SMOKE[task] if request.node.get_closest_marker("smoke") else FLAGS[task]
    p = harness.plan(task, data_dir, **flags)
    since = len(kernel.samples)
    kernel.sample()
    result = benchmark.pedantic(harness.keras_fit, args=(p, True, spe, seconds, rounds), rounds=1)
    kernel.sample()
    gflops = kernel.gflops(since)
    measured[(task, f"fit-spe{spe}")] = result["examples_per_sec"]
    benchmark.extra_info.update(
        task=task, mode=f"keras fit jit spe={spe}", precision="float32", examples_per_sec=result["examples_per_sec"],
        compile_seconds=result["compile_seconds"], kernel_gflops=gflops,
        ceiling_share=result["examples_per_sec"] * p.task.model.training_flops_per_example() / (gflops * 1e9))


@pytest.mark.parametrize("task,mode,precision,k", [pytest.param(*c, id=_id(c)) for c in CASES] +
                         [pytest.param("higgs", "xla", "float32", 4, marks=pytest.mark.smoke, id="smoke-higgs-xla")])
def test_fastcore(benchmark, request, data_dir, kernel, measured, task, mode, precision, k):
    rounds, seconds = _sizes(request)
    flags = SMOKE[task] if request.node.get_closest_marker("smoke") else FLAGS[task]
    p = harness.plan(task, data_dir, steps_per_call=k, precision=precision, mode=mode, **flags)
    ours = harness.Ours(p, seconds if mode != "eager" else min(seconds, 0.3))
    compare_reused = mode == "xla" and k > 1
    since = len(kernel.samples)

    def between_rounds():
        kernel.sample()
        if compare_reused:
            ours.reused_round()

    benchmark.pedantic(ours.streamed_round, setup=between_rounds, rounds=rounds if mode != "eager" else 3)
    eps = harness.statistics.median(ours.streamed)
    flops, gflops = p.task.model.training_flops_per_example(), kernel.gflops(since)
    info = dict(task=task, mode=f"{ours.step.mode} K={k}", precision=ours.precision.name, examples_per_sec=eps,
                compile_seconds=ours.compile_seconds, kernel_gflops=gflops, ceiling_share=eps * flops / (gflops * 1e9))
    if mode != "eager":
        info["utilisation"] = tensorboard.utilisation(flops, eps, ours.precision.name,
                                                      report.matmul_shapes(p.trainer.engine, p.batch_size))["utilisation"]
    if precision == "auto":
        info["precision_reason"] = ours.precision.reason
    if compare_reused:
        reused = harness.statistics.median(ours.reused)
        info.update(reused_examples_per_sec=reused, input_wait_share=max(0.0, 1 - eps / reused))
    if mode == "eager":
        measured[(task, "eager")] = eps
    elif measured.get((task, "eager")):
        info["ratio_vs_eager"] = eps / measured[(task, "eager")]
    best = fit_best(task, measured)
    if best:
        info["ratio_vs_fit"] = eps / best
    benchmark.extra_info.update(info)
