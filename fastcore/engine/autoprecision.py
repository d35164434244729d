"""`precision="auto"` on a CPU: the matmul peaks propose bfloat16, the model's own step decides.

A kernel-level gain does not carry over to every model: here bfloat16 matmuls run ~2x float32
under XLA, and the HIGGS step (512-wide layers) gained 11% (79.6k vs 71.8k ex/s), while the MNIST
step (100-wide layers, batch 32) ran at less than half the speed (118k vs 274k). So when the peaks
favour bfloat16, both compiled steps are timed on the run's first real batch and the faster wins.
The result is cached per machine and per `key` (the caller's description of model, batch and path).
"""
from __future__ import annotations

import time
from collections.abc import Callable

from fastcore.engine.precision import Precision
from fastcore.observe import calibrate

ROUNDS = 8       # timed calls per precision, alternating, after one each that compiles
MARGIN = 1.05    # bfloat16 must beat float32 by this much: it costs precision


def time_calls(calls: dict[str, Callable[[], object]], examples_per_call: int) -> dict[str, float]:
    """Best examples/s of each call; calls alternate, so a neighbour's load on a shared machine hits all alike."""
    for fn in calls.values():
        fn()   # trace + compile
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(ROUNDS):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: examples_per_call / seconds for name, seconds in best.items()}


def confirm(proposal: Precision, key: str, measure: Callable[[], dict[str, float]]) -> Precision:
    """`proposal` unless it is auto's bfloat16; then the faster of the two measured steps (cached under key).

    `measure()` returns {"float32": ex/s, "bfloat16": ex/s} for the model's own compiled step.
    """
    if proposal.name != "bfloat16" or not proposal.reason.startswith("auto"):
        return proposal
    rates = calibrate.cached(key)
    if rates is None:
        rates = measure()
        calibrate.store(key, rates)
    f32, bf16 = rates["float32"], rates["bfloat16"]
    measured = f"this step ran {bf16:,.0f} ex/s in bfloat16 vs {f32:,.0f} in float32"
    if bf16 >= MARGIN * f32:
        return Precision("bfloat16", f"{proposal.reason}; {measured}")
    return Precision("float32", f"auto: {measured} (bfloat16's faster matmuls do not pay off for this model)")
