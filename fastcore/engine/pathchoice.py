"""`mode="auto"`: the compiled path chosen by timing the model's own training step on this machine.

No fixed rule picks the fastest path for every model. On one 2-core CPU the HIGGS MLP ran fastest as XLA
with K steps per compiled call, while the Keras MNIST convnet ran 785 ex/s as a plain graph, 319 under
XLA with one step per call and 108 under XLA with K steps per call (XLA:CPU lowers convolutions and
their gradients to slower kernels than oneDNN's, and worse again inside the K-step while loop). On a
GPU XLA is expected to win; the same timing decides there (not measurable on the machines at hand).

So the candidates (XLA and a plain graph, each with one and with K steps per call) are each compiled and
timed on the run's first real batches, calls interleaved so a neighbour's load hits all alike, within a
time budget; the fastest is kept and the figures are cached per machine, model, batch and precision.
A convolutional model on a machine without a GPU is not timed as XLA with K steps (_xla_cpu_convolutions).
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
from fastcore.observe import calibrate

BUDGET_SECONDS = 20.0   # no new timing round starts after this (the first compile of each included)
ROUNDS = 5              # interleaved timed calls per surviving candidate, at most
OUT_OF_RACE = 2.0       # a candidate this many times slower than the best is not timed again
CALL_SECONDS = 0.5      # K-step candidates are timed with at most about this long a call (see timing_k)
PREFERENCE = ("xla/K", "xla/1", "graph/K", "graph/1")   # on a tie within TIE (2%), the first listed wins
TIE = 1.02


@dataclasses.dataclass(frozen=True)
class Path:
    """The compiled path a run uses: its mode, steps per call, and why (one line)."""
    mode: str
    steps_per_call: int
    reason: str
    rates: dict = dataclasses.field(default_factory=dict)   # {candidate: ex/s} as measured (or cached)


def resolve(mode: str, requested_k: int | None, precision_name: str, assembly, feed) -> Path:
    """The path for a run on `feed` (single batches per element): as asked, or timed (mode="auto")."""
    if mode != "auto" or assembly.strategy is not None:
        requested, mode = mode, "xla" if mode == "auto" else mode
        # Under XLA a convnet's default K is 1: XLA:CPU runs its K-step loop far slower (module docstring).
        most = 1 if mode == "xla" and assembly.convolutional() else feeding.MAX_STEPS_PER_CALL
        k = requested_k or feeding.steps_per_call(feed.batch_size, feed.steps_per_epoch, varying=bool(feed.varying),
                                                  most=most)
        return Path(mode, k, "requested" if mode == requested else "auto: XLA under a strategy (not timed)")
    k = requested_k or feeding.steps_per_call(feed.batch_size, feed.steps_per_epoch, varying=bool(feed.varying))
    precision = Precision(precision_name if precision_name != "auto" else "float32", "timing")
    looped_xla = not _xla_cpu_convolutions(assembly)
    try:
        threads = tf.config.threading.get_intra_op_parallelism_threads()   # 0: TensorFlow's default, all
        key = f"{_describe(assembly, feed)}/b{feed.batch_size}/k{k}/{precision.name}/threads{threads}"
        path = choose(assembly, precision, lambda n: list(feed.dataset.take(n)), feed.batch_size, k, key, looped_xla)
    except Exception as e:   # the run's own step raises it again, where fastcore reports it in one line
        return Path("xla", k if looped_xla else 1, f"auto: xla, not timed (the step raised {type(e).__name__})")
    if not looped_xla:
        return dataclasses.replace(path, reason=path.reason + "; XLA with K steps per call not timed: on a CPU "
                                                              "it ran a convnet at 0.02x a plain graph (BENCHMARKS.md)")
    return path


def _xla_cpu_convolutions(assembly) -> bool:
    """A convolutional model on a machine without a GPU. XLA:CPU lowers convolution gradients inside the
    K-step loop to element-at-a-time kernels (its canonicalization pass skips loop bodies): the BN convnet
    ran 0.02x a plain graph at K=4, and that compile took 72 s, too long to time on every first run. One
    step per call is timed: there it varies by model (in auto's own timing, the BN convnet 0.30x a graph,
    an Embedding + Conv1D text model 1.06x)."""
    return assembly.convolutional() and not tf.config.list_physical_devices("GPU")


def _describe(assembly, feed) -> str:
    """What the step's speed depends on: the models' layers and shapes, the step, the batch's spec."""
    step = getattr(assembly.step_fn, "__qualname__", type(assembly.step_fn).__name__)
    spec = ",".join(f"{s.dtype.name}{s.shape}" for s in tf.nest.flatten(feed.dataset.element_spec))
    return f"{assembly.describe()}/{step}/{spec}"


def choose(assembly, precision: Precision, batches: Callable[[int], list], batch_size: int, k: int,
           key: str, looped_xla: bool = True) -> Path:
    """The fastest path for this model: cached under `key`, else timed on the run's first batches.
    `looped_xla`: whether XLA with K steps per call is a candidate."""
    options = {"xla/1": ("xla", 1), "graph/1": ("graph", 1)}
    if k > 1:
        options.update({"xla/K": ("xla", k)} if looped_xla else {})
        options["graph/K"] = ("graph", k)
    rates = calibrate.cached(f"path/{key}")
    source = "measured before on this machine"
    if not _plausible(rates, options):
        rates, source = measure(assembly, precision, options, batches, batch_size), "measured now"
        calibrate.store(f"path/{key}", rates)
    best = max(rates, key=rates.get)
    for name in PREFERENCE:   # a near tie goes to the path asked for most often (and first-class on GPUs)
        if name in rates and rates[name] * TIE >= rates[best]:
            best = name
            break
    mode, steps = options[best]
    figures = ", ".join(f"{name.replace('/K', f'/{k}')} {rate:,.0f}" for name, rate in rates.items())
    return Path(mode, steps, f"auto: {mode}, {steps} step(s) per call, fastest of {figures} ex/s ({source})", rates)


def _plausible(rates, options) -> bool:
    return (isinstance(rates, dict) and set(rates) == set(options)
            and all(isinstance(v, (int, float)) and 0 < v < float("inf") for v in rates.values()))


def timing_k(k: int, single_step_seconds: float) -> int:
    """Steps per call for timing a K-step candidate: K, or fewer when a step is slow, so one call stays
    near CALL_SECONDS (a step that slow leaves nothing for K to amortize: per-call overhead is ~0.1 ms)."""
    return max(2, min(k, int(CALL_SECONDS / max(single_step_seconds, 1e-9))))


def measure(assembly, precision: Precision, options: dict, batches: Callable[[int], list],
            batch_size: int) -> dict[str, float]:
    """Best ex/s of each candidate's training call, interleaved; every timed model's weights put back."""
    start = time.perf_counter()
    engines = {name: _throwaway_engine(assembly, precision, mode, batch_size) for name, (mode, _) in options.items()}
    first = batches(1)[0]
    touched = [v for name, (_, steps) in options.items() if steps == 1
               for v in engines[name].train_one.get_concrete_function(first).graph.variables]
    put_back = _put_back_later(touched)
    try:
        calls = {name: _call(engines[name].train_one, first, batch_size)
                 for name, (_, steps) in options.items() if steps == 1}
        best = {name: _first_timed(call) for name, call in calls.items()}
        k = max(steps for _, steps in options.values())
        if k > 1:
            timed_k = timing_k(k, batch_size / max(best.values()))
            stacked = _stack(batches(timed_k))
            for name, (_, steps) in options.items():
                if steps > 1:
                    calls[name] = _call(engines[name].train_many, stacked, batch_size * timed_k)
                    best[name] = _first_timed(calls[name])
        for _ in range(ROUNDS - 1):
            if time.perf_counter() - start > BUDGET_SECONDS:
                break
            leader = max(best.values())
            for name, call in calls.items():
                if best[name] * OUT_OF_RACE >= leader:
                    best[name] = max(best[name], _timed(call))
        return best
    finally:
        put_back()


def _call(fn, batch, examples: int):
    return lambda: (examples, _block(fn(batch)))


def _first_timed(call) -> float:
    call()   # trace and compile
    return _timed(call)


def _timed(call) -> float:
    begin = time.perf_counter()
    examples, _ = call()
    return examples / (time.perf_counter() - begin)


def _block(logs) -> None:
    tf.nest.map_structure(lambda t: t.numpy(), logs)


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
