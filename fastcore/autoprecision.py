"""`--precision auto` on a CPU: the matmul peaks propose bfloat16, the task's own step decides.

A kernel-level gain does not carry over to every model: here bfloat16 matmuls run ~2x float32
under XLA, and the HIGGS step (512-wide layers) gained 11% (79.6k vs 71.8k ex/s), while the MNIST
step (100-wide layers, batch 32) ran at less than half the speed (118k vs 274k). So when the peaks
favour bfloat16, both compiled steps are timed on the run's first real batch and the faster wins.
The result is cached per machine, task, model API, batch, steps per call and path.
"""
from __future__ import annotations

import time

from fastcore import calibrate
from fastcore.precision import Precision

ROUNDS = 8       # timed calls per precision, alternating, after one each that compiles
MARGIN = 1.05    # bfloat16 must beat float32 by this much: it costs precision


def time_steps(p, batch, names=("float32", "bfloat16")) -> dict[str, float]:
    """Best examples/s of each precision's compiled step on `batch`; calls alternate between the
    precisions, so a neighbour's load on this shared machine hits both alike."""
    from fastcore import run   # run imports this module
    calls = {}
    for name in names:
        step = run.build_step(p, Precision(name, "timing"), p.config.mode)
        calls[name] = step.train_many if p.steps_per_call > 1 else step.train_one
        calls[name](*batch).numpy()   # trace + compile
    best = dict.fromkeys(names, float("inf"))
    for _ in range(ROUNDS):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn(*batch).numpy()
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: p.batch_size * p.steps_per_call / seconds for name, seconds in best.items()}


def confirm(p) -> Precision:
    """p.precision if it is not a bfloat16 proposal from `auto`; else the faster of the two measured steps."""
    if p.config.precision != "auto" or p.precision.name != "bfloat16":
        return p.precision
    import pipelines
    key = f"step/{p.task.name}/{p.config.model_api}/b{p.batch_size}/k{p.steps_per_call}/{p.config.mode}"
    rates = calibrate.cached(key)
    if rates is None:
        batch = next(iter(pipelines.train_stream(p.train, p.batch_size, p.config.seed, p.steps_per_call)))
        rates = time_steps(p, batch)
        calibrate.store(key, rates)
    f32, bf16 = rates["float32"], rates["bfloat16"]
    measured = f"this step ran {bf16:,.0f} ex/s in bfloat16 vs {f32:,.0f} in float32"
    if bf16 >= MARGIN * f32:
        return Precision("bfloat16", f"{p.precision.reason}; {measured}")
    return Precision("float32", f"auto: {measured} (bfloat16's faster matmuls do not pay off for this model)")
