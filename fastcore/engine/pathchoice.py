"""`mode="auto"`: the compiled path chosen by timing the model's own training step on this machine.

No fixed rule picks the fastest path for every model. On one 2-core CPU the HIGGS MLP ran fastest as XLA
with K steps per compiled call, while the Keras MNIST convnet ran 785 ex/s as a plain graph, 319 under
XLA with one step per call and 108 under XLA with K steps per call (XLA:CPU lowers convolutions and
their gradients to slower kernels than oneDNN's, and worse again inside the K-step while loop). On a
GPU XLA is expected to win; the same timing decides there (not measurable on the machines at hand).

So the candidates (XLA and a plain graph, each with one and with K steps per call) are each compiled and
timed on the run's first real batches (fastcore.observe.timing): calls interleaved (A B C D A B C D ...) so a
neighbour's load hits all alike, the fastest of LEAST-MOST rounds kept, no new round after BUDGET_SECONDS, a
candidate OUT_OF_RACE times slower than the best timed no more. The fastest wins unless the default order
(PREFERENCE: XLA with K steps first) has one within TIE of it: a near tie is no evidence, so it keeps the
earlier listed, said so. The figures are cached per machine, model, batch and precision, unless the timing
judged itself noisy ("noisy, not cached": used by this run, timed again by the next); a cached timing the
run contradicts (its own steady step far from the cached rate of the path it ran, `recheck`) is dropped.
Budget, measured on a 2-core Xeon (avx512_bf16, no AMX) with other work on half its CPUs: the MNIST MLP
(batch 32, K 50) 7.4-9.9 s on a first run, most of it the four compiles; 0.12 s once cached.
A convolutional model on a machine without a GPU runs XLA's K steps unrolled, not looped (Engine._steps), at
most UNROLLED_MOST of them, and only when XLA's one step is within UNROLL_WORTH of a graph's.
Each candidate trains with fresh optimizers, on fresh models from a factory or on the run's own models
(passed built), whose weights are put back afterwards.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import tensorflow as tf

from fastcore.engine import feeding
from fastcore.engine.precision import Precision
from fastcore.observe import calibrate, timing
from fastcore.options import MAX_STEPS_PER_CALL

BUDGET_SECONDS = 2.0    # no new timing round after this many seconds of rounds (the compiles come before)
LEAST, MOST = 3, 5      # interleaved timed rounds of every candidate still in the race
OUT_OF_RACE = 2.0       # a candidate this many times slower than the best is not timed again
CALL_SECONDS = 0.5      # K-step candidates are timed with at most about this long a call (see timing_k)
PREFERENCE = ("xla/K", "xla/1", "graph/K", "graph/1")   # the default first: on a near tie the first listed wins
TIE = 1.05              # ...within 5% of the fastest
# XLA's steps per call when they are unrolled (a convnet on a CPU): compile time grows with them. The zoo's text
# model (2-core Xeon, avx512_bf16): compiles 1.5 s at 1, 5.6 s at 8 (16, its steps then still in a branch: 10.5 s); 8 unrolled ran 1.09x Keras
# fit at its best where 1 step per call ran 1.01x (16 gained 3% more over 8 in a hand-written loop).
UNROLLED_MOST = 8
# ...timed only when XLA's one step takes less than this many times a graph step's: unrolling gained the text
# model 1.07-1.12x over one step per call, and where XLA's one step is far behind (the BN convnet: 3x a graph
# step's) no unrolling closes the gap, and its compile is the slowest of all.
UNROLL_WORTH = 2.0


@dataclasses.dataclass(frozen=True)
class Path:
    """The compiled path a run uses: its mode, steps per call, and why (one line)."""
    mode: str
    steps_per_call: int
    reason: str
    rates: dict = dataclasses.field(default_factory=dict)   # {candidate: ex/s} as measured (or cached)
    key: str = ""          # where the timing is cached (mode="auto")
    precision: str = ""    # the precision it was timed in


def resolve(mode: str, requested_k: int | None, precision_name: str, assembly, feed) -> Path:
    """The path for a run on `feed` (single batches per element): as asked, or timed (mode="auto")."""
    if mode != "auto" or assembly.strategy is not None:
        requested, mode = mode, "xla" if mode == "auto" else mode
        # Under XLA a convnet's default K is 1: XLA:CPU runs its K-step loop far slower (module docstring).
        most = 1 if mode == "xla" and assembly.convolutional() else MAX_STEPS_PER_CALL
        k = requested_k or feeding.steps_per_call(feed.batch_size, feed.steps_per_epoch, varying=bool(feed.varying),
                                                  most=most)
        return Path(mode, k, "requested" if mode == requested else "auto: XLA under a strategy (not timed)")
    def k_at_most(most: int) -> int:
        return requested_k or feeding.steps_per_call(feed.batch_size, feed.steps_per_epoch, varying=bool(feed.varying),
                                                     most=most)
    k = k_at_most(MAX_STEPS_PER_CALL)
    unrolled = assembly.unrolls_xla_steps()
    xla_k = k_at_most(UNROLLED_MOST) if unrolled else k
    precision = Precision(precision_name if precision_name != "auto" else "float32", "timing")
    try:
        threads = tf.config.threading.get_intra_op_parallelism_threads()   # 0: TensorFlow's default, all
        key = (f"{_describe(assembly, feed)}/b{feed.batch_size}/k{k}" + (f"/unrolled{xla_k}" if unrolled else "")
               + f"/{precision.name}/threads{threads}")
        return choose(assembly, precision, lambda n: list(feed.dataset.take(n)), feed.batch_size, k, key,
                      xla_k=xla_k, unrolled=unrolled)
    except Exception as e:   # the run's own step raises it again, where fastcore reports it in one line
        return Path("xla", 1 if unrolled else k, f"auto: xla, not timed (the step raised {type(e).__name__})")


def recheck(path: Path, summary: dict) -> str | None:
    """After a run on auto's path: when its own steady step contradicts the cached rate of that path
    (timing.contradicts), the cached timing is dropped (the next run times again); the line saying so."""
    if not path.key or (summary.get("mode"), summary.get("steps_per_call"), summary.get("precision")) != (
            path.mode, path.steps_per_call, path.precision):
        return None   # the run did not run what was timed (precision auto moved it)
    rates = calibrate.cached(f"path/{path.key}")
    candidate = f"{path.mode}/{'1' if path.steps_per_call == 1 else 'K'}"
    ran = timing.run_rate(summary)
    if not rates or candidate not in rates or ran is None or not timing.contradicts(rates[candidate], ran):
        return None
    calibrate.forget(f"path/{path.key}")
    return (f"auto path: this run's {_label(candidate, path.steps_per_call)} step ran {ran:,.0f} ex/s, the cached "
            f"timing said {rates[candidate]:,.0f}: dropped from the cache, timed again next run")


def _describe(assembly, feed) -> str:
    """What the step's speed depends on: the models' layers and shapes, the step, the batch's spec."""
    step = getattr(assembly.step_fn, "__qualname__", type(assembly.step_fn).__name__)
    spec = ",".join(f"{s.dtype.name}{s.shape}" for s in tf.nest.flatten(feed.dataset.element_spec))
    return f"{assembly.describe()}/{step}/{spec}"


def choose(assembly, precision: Precision, batches: Callable[[int], list], batch_size: int, k: int,
           key: str, xla_k: int | None = None, unrolled: bool = False) -> Path:
    """The fastest path for this model: cached under `key`, else timed on the run's first batches.
    `xla_k`: XLA's steps per call (default k); `unrolled`: they are unrolled (Engine._steps), and timed only
    when XLA's one step is within UNROLL_WORTH of a graph's."""
    xla_k = xla_k or k
    options = {"xla/1": ("xla", 1), "graph/1": ("graph", 1)}
    if xla_k > 1:
        options["xla/K"] = ("xla", xla_k)
    if k > 1:
        options["graph/K"] = ("graph", k)
    rates, source = calibrate.cached(f"path/{key}"), "cached"
    if not _plausible(rates, options, unrolled):
        start = time.perf_counter()
        timed, work = measure(assembly, precision, options, batches, batch_size, unrolled)
        rates = timed.rates(work)
        source = (f"timed now in {time.perf_counter() - start:.1f} s"
                  + (f", noisy ({timed.noise}), not cached" if timed.noise else ""))
        if not timed.noise:
            calibrate.store(f"path/{key}", rates)
    fastest = max(rates, key=rates.get)
    # a near tie goes to the path asked for most often (and first-class on GPUs)
    best = next(name for name in PREFERENCE if name in rates and rates[name] * TIE >= rates[fastest])
    mode, steps = options[best]

    def label(name: str) -> str:
        return _label(name, options[name][1])
    figures = ", ".join(f"{label(name)} {rate:,.0f}" for name, rate in rates.items())
    tie = (f"; {label(fastest)} within {TIE - 1:.0%}: a near tie keeps {label(best)}, listed first"
           if best != fastest else "")
    return Path(mode, steps, f"auto: {mode}, {steps} step(s) per call; {figures} ex/s{tie} ({source})"
                + _unrolled_note(options, rates, unrolled), rates, key, precision.name)


def _unrolled_note(options: dict, rates: dict, unrolled: bool) -> str:
    """What auto did with XLA's K steps for a convnet on a CPU (nothing to say otherwise)."""
    if not unrolled or "xla/K" not in options:
        return ""
    if "xla/K" in rates:
        return "; XLA's steps unrolled (a convnet on a CPU: XLA's K-step loop ran 0.02x a plain graph, BENCHMARKS.md)"
    return (f"; XLA's steps not timed unrolled (a convnet on a CPU): XLA's one step ran "
            f"{rates['xla/1'] / rates['graph/1']:.2f}x a graph's")


def _label(name: str, k: int) -> str:
    return name.replace("/K", f"/{k}")


def _plausible(rates, options, unrolled: bool = False) -> bool:
    """Cached figures for every candidate (an unrolled XLA one may have been left out: measure)."""
    expected = [set(options)] + ([set(options) - {"xla/K"}] if unrolled else [])
    return isinstance(rates, dict) and set(rates) in expected and all(isinstance(v, (int, float)) and 0 < v < float("inf") for v in rates.values())


def timing_k(k: int, single_step_seconds: float) -> int:
    """Steps per call for timing a K-step candidate: K, or fewer when a step is slow, so one call stays
    near CALL_SECONDS (a step that slow leaves nothing for K to amortize: per-call overhead is ~0.1 ms)."""
    return max(2, min(k, int(CALL_SECONDS / max(single_step_seconds, 1e-9))))


def measure(assembly, precision: Precision, options: dict, batches: Callable[[int], list],
            batch_size: int, unrolled: bool = False) -> tuple[timing.Timing, dict[str, int]]:
    """Each candidate's training call timed in interleaved rounds, and the examples one call of each trains;
    every timed model's weights put back. Unrolled XLA (`unrolled`) is left out, not compiled, when XLA's one
    step took over UNROLL_WORTH times a graph step's."""
    engines = {name: _throwaway_engine(assembly, precision, mode, batch_size) for name, (mode, _) in options.items()}
    first = batches(1)[0]
    touched = [v for name, (_, steps) in options.items() if steps == 1
               for v in engines[name].train_one.get_concrete_function(first).graph.variables]
    put_back = _put_back_later(touched)
    try:
        calls = {name: _call(engines[name].train_one, first) for name, (_, steps) in options.items() if steps == 1}
        work = dict.fromkeys(calls, batch_size)
        k = max(steps for _, steps in options.values())
        if k > 1:   # one step's time (after the compile) sizes the K-step calls
            one_step = {name: _compiled_then_timed(call) for name, call in calls.items()}
            timed_k = timing_k(k, min(one_step.values()))
            if unrolled and one_step["xla/1"] > UNROLL_WORTH * one_step["graph/1"]:
                options = {name: option for name, option in options.items() if name != "xla/K"}
            for name, (_, steps) in options.items():
                if steps > 1:   # an unrolled call compiles each of its steps: never more than it will run
                    n = min(steps, timed_k)
                    calls[name], work[name] = _call(engines[name].train_many, _stack(batches(n))), batch_size * n
        return timing.interleaved(calls, BUDGET_SECONDS, LEAST, MOST, behind=OUT_OF_RACE, work=work), work
    finally:
        put_back()


def _call(fn, batch):
    return lambda: tf.nest.map_structure(lambda t: t.numpy(), fn(batch))


def _compiled_then_timed(call) -> float:
    call()   # trace and compile
    return timing.time_call(call)


def _stack(batches: list):
    return tf.nest.map_structure(lambda *leaves: tf.stack(leaves), *batches)


def _throwaway_engine(assembly, precision: Precision, mode: str, batch_size: int):
    """An engine with fresh optimizers over fresh models (a factory) or the run's own (passed built)."""
    return assembly.engine(precision, mode, batch_size, assembly.models(precision),
                           assembly.optimizers(precision, fresh=True))


def _put_back_later(touched: list) -> Callable[[], None]:
    """A call restoring every variable the timed steps touch: the models passed built (or `lambda: model`)
    are the run's, and a step's closure may hold state of its own (a SeedGenerator)."""
    saved = [(v, v.numpy()) for v in {id(v): v for v in touched}.values()]

    def put_back() -> None:
        for variable, value in saved:
            variable.assign(value)
    return put_back
