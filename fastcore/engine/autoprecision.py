"""`precision="auto"` on a CPU: the matmul peaks propose bfloat16, the model's own step decides.

A kernel-level gain does not carry over to every model: here bfloat16 matmuls run ~2x float32
under XLA, and the HIGGS step (512-wide layers) gained 11% (79.6k vs 71.8k ex/s), while the MNIST
step (100-wide layers, batch 32) ran at less than half the speed (118k vs 274k). So when the peaks
favour bfloat16, the compiled steps are timed on the run's first real batch and the fastest wins.

Under XLA a third candidate is the bfloat16 step as a plain graph: XLA:CPU (TensorFlow 2.21) has no
AMX bfloat16 matmul, oneDNN has. On a Xeon with AMX a 500x512x512 bfloat16 matmul ran 227 GFLOP/s
under XLA and 799 through oneDNN (none of XLA's oneDNN / XNNPACK / YNNPACK flags changed that), and
the HIGGS step 87.1k ex/s as a plain graph vs 55.0k under XLA. Where XLA's bfloat16 dot is on par
(an AMD EPYC without AMX), the XLA step keeps the run.
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


GRAPH_BF16 = "bfloat16/graph"   # the candidate name of the bfloat16 step as a plain tf.function


def confirm(proposal: Precision, key: str, measure: Callable[[], dict[str, float]],
            candidates: tuple[str, ...] = ("float32", "bfloat16")) -> Precision:
    """`proposal` unless it is auto's bfloat16; then the fastest of the measured steps (cached under key).

    `measure()` returns {candidate: ex/s} for the model's own compiled step: "float32" and "bfloat16" on
    the run's path and, when in `candidates`, GRAPH_BF16. bfloat16 must beat float32 by MARGIN (it costs
    precision); the plain graph must beat the XLA bfloat16 step by MARGIN (XLA is the path asked for).
    """
    if proposal.name != "bfloat16" or not proposal.reason.startswith("auto"):
        return proposal
    rates = calibrate.cached(key)
    if rates is None or set(rates) != set(candidates):
        rates = measure()
        calibrate.store(key, rates)
    f32, bf16 = rates["float32"], rates["bfloat16"]
    graph = rates.get(GRAPH_BF16, 0.0)
    on_graph = graph >= MARGIN * bf16
    measured = (f"this step ran {bf16:,.0f} ex/s in bfloat16"
                + (f", {graph:,.0f} in bfloat16 as a plain graph (oneDNN)" if GRAPH_BF16 in rates else "")
                + f" vs {f32:,.0f} in float32")
    if max(bf16, graph) < MARGIN * f32:
        return Precision("float32", f"auto: {measured} (bfloat16's faster matmuls do not pay off for this model)")
    if on_graph:
        return Precision("bfloat16", f"{proposal.reason}; {measured}: the plain graph, whose oneDNN matmuls "
                                     f"beat XLA's here", mode="graph")
    return Precision("bfloat16", f"{proposal.reason}; {measured}")
