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

Timing is robust to a neighbour's load (fastcore.observe.timing): the candidates' compiled calls on the
run's first batches (at most STEPS_TIMED of its K steps) interleaved, A B C A B C ..., the fastest of
LEAST-MOST rounds kept, no new round after BUDGET_SECONDS. bfloat16 must beat float32 by MARGIN (it costs
precision), else the near tie keeps float32, said so. The rates are cached per machine and per `key` (model,
batch, K, path) unless the timing judged itself noisy ("noisy, not cached": this run uses it, the next times
again); a cached timing the run contradicts (its own steady step far from the cached rate of what it ran,
`recheck`) is dropped, said so. One run once spent ~30 s here (every call K steps, no budget).
Budget, measured on a 2-core Xeon (avx512_bf16, no AMX) with other work on half its CPUs: the HIGGS step
(batch 500, K 19) 10.9-14.3 s on a first run, most of it the three compiles; 0.12 s once cached.
"""
from __future__ import annotations

import time
from collections.abc import Callable

import tensorflow as tf

from fastcore import distribute
from fastcore.engine.precision import Precision, resolve
from fastcore.observe import calibrate, timing

LEAST, MOST = 3, 8      # interleaved timed rounds of every candidate, after one call each that compiles
BUDGET_SECONDS = 2.0    # no new round after this many seconds of rounds
MARGIN = 1.05           # bfloat16 must beat float32 by this much (it costs precision), the graph XLA's bfloat16
STEPS_TIMED = 4         # a timed call walks at most this many of the K steps: no faster per step, only longer
GRAPH_BF16 = "bfloat16/graph"   # the candidate name of the bfloat16 step as a plain tf.function


def confirm(proposal: Precision, key: str, measure: Callable[[], timing.Timing], examples_per_call: int,
            candidates: tuple[str, ...] = ("float32", "bfloat16")) -> Precision:
    """`proposal` unless it is auto's bfloat16; then the fastest of the timed steps, cached under key unless
    the timing was noisy.

    `measure()` times the model's own compiled call (`examples_per_call` examples) per candidate: "float32"
    and "bfloat16" on the run's path and, when in `candidates`, GRAPH_BF16. bfloat16 must beat float32 by
    MARGIN (it costs precision); the plain graph must beat the XLA bfloat16 step by MARGIN (XLA was asked for).
    """
    if proposal.name != "bfloat16" or not proposal.reason.startswith("auto"):
        return proposal
    rates, source = calibrate.cached(key), "cached"
    if rates is None or set(rates) != set(candidates):
        start = time.perf_counter()
        timed = measure()
        rates = timed.rates(dict.fromkeys(candidates, examples_per_call))
        source = (f"timed now in {time.perf_counter() - start:.1f} s"
                  + (f", noisy ({timed.noise}), not cached" if timed.noise else ""))
        if not timed.noise:
            calibrate.store(key, rates)
    f32, bf16 = rates["float32"], rates["bfloat16"]
    graph = rates.get(GRAPH_BF16, 0.0)
    figures = "step " + ", ".join(f"{name} {rate:,.0f}" for name, rate in rates.items()) + " ex/s"
    if max(bf16, graph) < f32:
        return Precision("float32", f"auto: float32, {figures} ({source})")
    if max(bf16, graph) < MARGIN * f32:
        return Precision("float32", f"auto: float32, {figures}: bfloat16 within {MARGIN - 1:.0%}, a near tie keeps "
                                    f"float32 ({source})")
    if bf16 < MARGIN * f32 or graph >= MARGIN * bf16:
        return Precision("bfloat16", f"auto: bfloat16 as a plain graph (oneDNN), {figures} ({source})", mode="graph")
    tie = f": the graph within {MARGIN - 1:.0%}, a near tie keeps XLA" if graph > bf16 else ""
    return Precision("bfloat16", f"auto: bfloat16, {figures}{tie} ({source})")


def recheck(precision: Precision, key: str, summary: dict) -> str | None:
    """After a run in auto's precision: when its own steady step contradicts the cached rate of that precision
    (timing.contradicts), the cached timing is dropped (the next run times again); the line saying so."""
    rates = calibrate.cached(key)
    candidate = GRAPH_BF16 if precision.mode == "graph" else precision.name
    ran = timing.run_rate(summary)
    if not rates or candidate not in rates or ran is None or not timing.contradicts(rates[candidate], ran):
        return None
    calibrate.forget(key)
    return (f"auto precision: this run's {candidate} step ran {ran:,.0f} ex/s, the cached timing said "
            f"{rates[candidate]:,.0f}: dropped from the cache, timed again next run")


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
    key = cache_key(assembly, batch_size, k, mode)
    candidates = ("float32", "bfloat16") + ((GRAPH_BF16,) if graph_bf16 else ())

    steps = min(k, STEPS_TIMED)

    def measure() -> timing.Timing:
        batch = first_call()
        if k > 1:
            batch = tf.nest.map_structure(lambda t: t[:steps], batch)
        calls = {}
        for candidate in candidates:
            precision, _, path = candidate.partition("/")
            engine = assembly.twin(Precision(precision, "timing"), path or mode, batch_size)
            fn = engine.train_many if k > 1 else engine.train_one
            calls[candidate] = lambda fn=fn: tf.nest.map_structure(lambda t: t.numpy(), fn(batch))
        return timing.interleaved(calls, BUDGET_SECONDS, LEAST, MOST)
    return confirm(proposal, key, measure, batch_size * steps, candidates)


def cache_key(assembly, batch_size: int, k: int, mode: str) -> str:
    """Where auto's step timing is cached: the models, the batch, K and the path asked for."""
    return f"step/{assembly.describe()}/b{batch_size}/k{k}/{mode}"
