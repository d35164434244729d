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

import tensorflow as tf

from fastcore import distribute
from fastcore.engine.precision import Precision, resolve
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


def decide(name: str, mode: str, assembly, first_call: Callable[[], object], batch_size: int, k: int,
           built: bool, recorded: str | None = None) -> Precision:
    """The run's precision for `name` (auto | float32 | bfloat16 | float16).

    `assembly` builds the timing candidates (fastcore.engine.assembly.Assembly); `first_call()` gives the
    run's first compiled call's batch; `built`: the run's models exist already (auto cannot rebuild them);
    `recorded`: the precision of the checkpoint a run resumes, which auto keeps (with its cached path)."""
    if name == "auto" and recorded:
        path = _choose(name, mode, assembly, first_call, batch_size, k, built).mode if recorded == "bfloat16" else None
        return Precision(recorded, "auto: as trained in the checkpoint it resumes", mode=path)
    chosen = _choose(name, mode, assembly, first_call, batch_size, k, built)
    strategy = assembly.strategy
    if name == "auto" and distribute.multi_worker(strategy):
        # Each worker measured alone; they must train in one precision, or their collectives mismatch.
        names = ("float32", "bfloat16", "float16")
        votes = distribute.replica_sums(strategy, [float(chosen.name == n) for n in names])
        if votes[names.index(chosen.name)] != strategy.num_replicas_in_sync:
            return Precision("float32", "auto: the workers measured different winners, so all train in float32")
    return chosen


def _choose(name, mode, assembly, first_call, batch_size, k, built) -> Precision:
    graph_bf16 = mode == "xla" and assembly.strategy is None   # XLA:CPU lacks oneDNN's AMX bfloat16 matmuls
    proposal = resolve(name, xla=mode == "xla", graph_bf16=graph_bf16)
    if name != "auto" or proposal.name != "bfloat16":
        return proposal
    if not assembly.factories or built:
        return Precision("float32", "auto: the model was passed built, so it cannot be rebuilt in bfloat16 to "
                                    "time both; pass a factory (a function returning the model) to let auto choose")
    again = assembly.models(Precision("float32", "key"))
    if any(m is other for m, other in zip(assembly.probe_models().values(), again.values())):
        return Precision("float32", "auto: the model factory returns the same model each time (lambda: model), so "
                                    "it cannot be rebuilt in bfloat16 to time both; pass a function that builds a new one")
    key = f"step/{assembly.describe()}/b{batch_size}/k{k}/{mode}"
    candidates = ("float32", "bfloat16") + ((GRAPH_BF16,) if graph_bf16 else ())

    def measure() -> dict[str, float]:
        batch = first_call()
        calls = {}
        for candidate in candidates:
            precision, _, path = candidate.partition("/")
            engine = assembly.twin(Precision(precision, "timing"), path or mode, batch_size)
            fn = engine.train_many if k > 1 else engine.train_one
            calls[candidate] = lambda fn=fn: tf.nest.map_structure(lambda t: t.numpy(), fn(batch))
        return time_calls(calls, batch_size * k)
    return confirm(proposal, key, measure, candidates)
