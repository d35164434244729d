"""The machine's ceiling per dtype: the best matmul rate it reaches however compiled, measured once, cached.

Utilisation = achieved FLOP/s / ceiling, and a ceiling must be one: the fastest the machine ran the
operation an MLP spends its time in. So for a dtype the ceiling is the best of
  - both compile paths: XLA (`tf.function(jit_compile=True)`, fastcore.layers.matmul: bfloat16 as a
    bf16 x bf16 -> f32 dot) and the plain graph (oneDNN kernels, which use AMX where the CPU has it);
  - two shapes: a large square matmul (`LARGE`^3) and the step's own largest matmul (batch x in x out);
  - all threads (what a run has), in a child process so this process's TensorFlow settings and compiled
    functions stay untouched.
Earlier the peak was one 1024^2 XLA matmul on one thread x threads, and Keras fit reached 108% of it:
a single path and shape is a floor, not a ceiling.

A neighbour's load once made the same command read the float32 peak as 14, 19, 24, 34 and 40 GFLOP/s, each
cached for good. So the matmuls are timed in interleaved rounds (fastcore.observe.timing: every entry once per
round, the fastest repeat kept, LEAST to MOST rounds, no new round after BUDGET_SECONDS), and a timing that
judges itself noisy (repeats apart, or other work on the CPUs meanwhile) is used for this run and not cached.
A cached peak the run contradicts (the step's achieved FLOP/s above it: utilisation over 100%) is measured
again at once, and the contradicted figure replaced or dropped (a stopped run, which does not wait to measure,
drops it), said in the utilisation line. A run above a fresh peak reports utilisation 100% and says the peak
was measured low. (A run far below the peak contradicts nothing: a small model's step is bound by overhead.)
Budget, measured on a 2-core Xeon (avx512_bf16, no AMX) with other work on half its CPUs (load average 3-5):
the end-of-run float32 ceiling (2 paths x 2 shapes) 8.0-11.7 s on a first run, 0.00 s once cached; auto
precision's three 2048^3 peaks 13-16 s; of each, about 4 s is the child starting TensorFlow.

Cached in `$FASTCORE_CACHE_DIR/calibration.json` (default `~/.cache/fastcore`) under a key of CPU model,
CPU count and TensorFlow version, one entry per dtype/path/shape. Concurrent runs do not race: a file
lock (fcntl) is held from reading the cache to writing it, so the second run waits and reads what the
first measured. `python -m fastcore.profile calibrate` measures again. The cache and its lock are never
opened through a symbolic link (UsageError), and a cached figure is used only when plausible (finite,
above MIN_GFLOPS, under what the machine's CPUs and GPUs could reach at all): anything else is measured
again. A fresh figure outside those bounds raises Unavailable, so no absurd utilisation is reported.

`peaks()` (per path, the large shape) is what `precision="auto"` compares before it times the model's
own step in both precisions.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import platform
import signal
import sys
import time
import typing

from fastcore import atomic, children
from fastcore.observe import timing
from pipelines import rowcache

SIZE = 1024            # the bench's in-run kernel (bench/harness.py); the ceiling uses LARGE
LARGE = 2048           # 2 x 2048^3 = 17 GFLOP per matmul
MIN_STEP_MACS = 1 << 20   # a step matmul smaller than this (sine's 1x10x10) is not worth a measurement
LEAST, MOST = 3, 6     # interleaved rounds of every entry (after one warm-up call each, which compiles)
BUDGET_SECONDS = 2.0   # no new round after this many seconds of rounds
DTYPES = ("float32", "bfloat16", "float16")
PATHS = ("xla", "graph")
MIN_GFLOPS = 0.1                # any CPU of this century multiplies faster
PER_CPU_GFLOPS = 10_000         # ~1.3x an AMX core's bfloat16 peak (1,024 FMA/cycle at ~3.8 GHz)
PER_GPU_GFLOPS = 10_000_000     # ~4x the densest GPU tensor-core rate

Shape = tuple[int, int, int]   # (m, k, n): an [m, k] x [k, n] matmul


def cache_path() -> str:
    """Beside the parsed-data caches: one folder rule ($FASTCORE_CACHE_DIR, else ~/.cache/fastcore)."""
    return os.path.join(rowcache.cache_dir(), "calibration.json")


class Unavailable(RuntimeError):
    """No trustworthy ceiling: the measurement failed or gave a figure the machine cannot reach."""


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def machine_key() -> str:
    import tensorflow as tf
    return f"{cpu_model()} | {os.cpu_count()} cpus | tensorflow {tf.__version__} | ceiling v2"


def threads() -> int:
    """The threads a run's matmuls use: TensorFlow's intra-op setting, else the CPUs this process may use."""
    import tensorflow as tf
    configured = tf.config.threading.get_intra_op_parallelism_threads()
    if configured:
        return configured
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def entry(dtype: str, path: str, shape: Shape) -> str:
    return f"{dtype}/{path}/{shape[0]}x{shape[1]}x{shape[2]}"


def flop(name: str) -> int:
    m, k, n = (int(v) for v in name.split("/")[2].split("x"))
    return 2 * m * k * n


def measure(names: list[str], budget: float = BUDGET_SECONDS) -> timing.Timing:
    """The entries' matmuls (names as entry() writes them), each compiled, then timed in interleaved rounds."""
    return timing.interleaved({name: _matmul_call(name) for name in names}, budget, LEAST, MOST)


def _matmul_call(name: str):
    import tensorflow as tf
    from fastcore.layers import matmul as model_matmul   # the op the models run (bf16 under XLA: f32 accumulation)
    dtype, path, shape = name.split("/")
    if path not in PATHS:
        raise ValueError(f"unknown path {path!r}: choose one of {', '.join(PATHS)}")
    matmul = tf.function(model_matmul, jit_compile=path == "xla")
    m, k, n = (int(v) for v in shape.split("x"))
    a = tf.cast(tf.random.stateless_uniform([m, k], seed=[1, 2]), dtype)
    b = tf.cast(tf.random.stateless_uniform([k, n], seed=[3, 4]), dtype)
    return lambda: matmul(a, b).numpy()


class Rate(typing.NamedTuple):
    gflops: float
    cached: bool
    noise: str | None = None   # why a fresh figure was not cached (fastcore.observe.timing)


class Measured(typing.NamedTuple):
    gflops: dict[str, float]   # {entry: GFLOP/s}
    noise: str | None          # the timing's own verdict: None when quiet (then cached)


def highest_plausible_gflops() -> float:
    """A bound no matmul on this machine can pass: its CPUs (and GPUs) at a generous per-device ceiling."""
    import tensorflow as tf
    gpus = len(tf.config.list_physical_devices("GPU"))
    return (os.cpu_count() or 1) * PER_CPU_GFLOPS + gpus * PER_GPU_GFLOPS


def plausible(gflops) -> bool:
    return (isinstance(gflops, (int, float)) and not isinstance(gflops, bool) and math.isfinite(gflops)
            and MIN_GFLOPS <= gflops <= highest_plausible_gflops())


def _measurements(value) -> bool:
    """A stored measurement: a non-empty {name: finite positive number} (a rate or a time)."""
    return isinstance(value, dict) and bool(value) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in value.values())


def _load() -> dict:
    """The cache's contents; missing or unreadable: {} (measure again); a symbolic link: UsageError."""
    try:
        fd = atomic.open_private(cache_path(), "the calibration cache", create=False)
    except OSError:
        return {}
    try:
        with os.fdopen(fd) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


@contextlib.contextmanager
def _locked():
    """The cache's lock, held from reading it to writing it; without a writable cache folder, no lock
    (and no cache: the figures are measured, not stored). A symbolic link in its place: UsageError."""
    try:
        os.makedirs(os.path.dirname(cache_path()), exist_ok=True)
        fd = atomic.open_private(cache_path() + ".lock", "the calibration cache's lock file")
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _save(data: dict) -> None:
    """Rewrite the cache atomically; a read-only or full cache folder costs the cache, never the run."""
    try:
        atomic.write_json(cache_path(), data)
    except OSError:
        pass


def rates(entries: list[tuple[str, str, Shape]], refresh: bool = False, measure: bool = True) -> dict[str, Rate]:
    """{entry: Rate}; the missing or implausible ones (all with `refresh`) are measured in one child process,
    under the lock, and cached unless the timing was noisy (then any older figure for them is dropped too).
    Raises Unavailable when the measurement fails or is itself implausible, or when one is missing and
    `measure` is False (a run stopped by a signal must end promptly)."""
    for dtype, path, _ in entries:
        if dtype not in DTYPES or path not in PATHS:
            raise ValueError(f"no calibration for {dtype}/{path}: dtypes {DTYPES}, paths {PATHS}")
    key = machine_key()
    with _locked():
        data = _load()
        cached = data.get(key, {})
        out = {}
        for dtype, path, shape in entries:
            value = cached.get(entry(dtype, path, shape)) if isinstance(cached, dict) else None
            if isinstance(value, dict) and plausible(value.get("gflops")) and not refresh:
                out[entry(dtype, path, shape)] = Rate(value["gflops"], True)
        missing = [e for e in entries if entry(*e) not in out]
        if missing and not measure:
            raise Unavailable("the machine's peak is not cached and a stopped run does not wait to measure it "
                              "(python -m fastcore.profile calibrate)")
        if missing:
            measured = _measure_in_child(missing)
            wrong = {name: gflops for name, gflops in measured.gflops.items() if not plausible(gflops)}
            if wrong:
                raise Unavailable(f"the {', '.join(wrong)} matmul measured {', '.join(f'{g:g}' for g in wrong.values())} "
                                  f"GFLOP/s, outside what {os.cpu_count()} CPUs can reach "
                                  f"({MIN_GFLOPS:g} to {highest_plausible_gflops():,.0f})")
            if not isinstance(data.get(key), dict):
                data[key] = {}
            for name, gflops in measured.gflops.items():
                if measured.noise:
                    data[key].pop(name, None)   # a figure this run measured again is no longer trusted
                else:
                    data[key][name] = {"gflops": round(gflops, 1), "threads": threads(),
                                       "measured_by": f"fastest of {LEAST}-{MOST} interleaved rounds, quiet"}
                out[name] = Rate(gflops, False, measured.noise)
            _save(data)
    return out


def _measure_in_child(entries: list[tuple[str, str, Shape]]) -> Measured:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = children.run([sys.executable, "-m", "fastcore.observe.calibrate", *(entry(*e) for e in entries)],
                          timeout=900, env=env)
    lines = result.stdout.strip().splitlines()
    if result.returncode < 0:   # a signal (Ctrl-C reaches it too): a run that goes on says so
        raise Unavailable(f"the matmul calibration was stopped by {signal.Signals(-result.returncode).name}")
    if result.returncode != 0 or not lines:
        last = (result.stderr.strip().splitlines() or [f"exit {result.returncode}"])[-1]
        raise Unavailable(f"the matmul calibration failed ({last[:200]})")
    timed = timing.Timing(**json.loads(lines[-1]))   # the noise is judged here, by this process's thresholds
    return Measured(timed.rates({name: flop(name) / 1e9 for name in timed.seconds}), timed.noise)


def ceiling(dtype: str, step_shapes: list[Shape] = (), refresh: bool = False, measure: bool = True,
            achieved: float | None = None) -> dict:
    """The dtype's ceiling: the best of both paths on the large shape and the step's largest matmul.
    `achieved`: the run's own GFLOP/s; a cached ceiling below it is measured again (unless not `measure`).

    Returns {"gflops", "path", "shape", "cached", "measured", "status"}: where the best rate came from, every
    rate, and one short phrase on its provenance ("cached", "measured now in 8.1 s, noisy (...), not cached").
    """
    shapes = [(LARGE, LARGE, LARGE)]
    big = [s for s in step_shapes if s[0] * s[1] * s[2] >= MIN_STEP_MACS]
    if big:
        shapes.append(max(big, key=lambda s: s[0] * s[1] * s[2]))
    entries = [(dtype, path, shape) for path in PATHS for shape in shapes]
    start = time.perf_counter()
    measured = rates(entries, refresh, measure)
    top = _best(measured, start)
    if achieved is not None and achieved > top["gflops"] and any(rate.cached for rate in measured.values()):
        was = f"the run's {achieved:,.1f} GFLOP/s beat the cached peak {top['gflops']:,.0f}"
        if not measure:   # a stopped run does not wait: the next run measures it
            for name in (name for name, rate in measured.items() if rate.cached):
                forget(name)
            return {**top, "status": f"{was}: dropped from the cache (a stopped run does not measure)"}
        start = time.perf_counter()
        top = _best(rates(entries, refresh=True), start)
        top["status"] = f"{was}: {top['status']}"
    return top


def _best(measured: dict[str, Rate], start: float) -> dict:
    best = max(measured, key=lambda name: measured[name].gflops)
    _, path, shape = best.split("/")
    noise = next((rate.noise for rate in measured.values() if rate.noise), None)
    cached = all(rate.cached for rate in measured.values())
    status = "cached" if cached else f"measured now in {time.perf_counter() - start:.1f} s"
    return {"gflops": round(measured[best].gflops, 1), "path": path, "shape": shape, "cached": cached,
            "measured": {name: round(rate.gflops, 1) for name, rate in measured.items()},
            "status": status + (f", noisy ({noise}), not cached" if noise else "")}


def peaks(pairs: list[tuple[str, str]], refresh: bool = False) -> dict[str, Rate]:
    """{"dtype/path": Rate on the large shape}: what `auto` compares per path."""
    measured = rates([(dtype, path, (LARGE, LARGE, LARGE)) for dtype, path in pairs], refresh)
    return {f"{dtype}/{path}": measured[entry(dtype, path, (LARGE, LARGE, LARGE))] for dtype, path in pairs}


def cached(name: str):
    """The measurements stored under `name` for this machine ({name: finite positive number}), or None
    (never stored, or damaged: measure again)."""
    mine = _load().get(machine_key())
    value = mine.get(name) if isinstance(mine, dict) else None
    return value if _measurements(value) else None


def store(name: str, value) -> None:
    """Store `value` under `name` for this machine (under the lock; atomic rewrite of the cache file)."""
    with _locked():
        data = _load()
        if not isinstance(data.get(machine_key()), dict):
            data[machine_key()] = {}
        data[machine_key()][name] = value
        _save(data)


def forget(name: str) -> None:
    """Drop what is stored under `name` for this machine (a figure a run contradicted): measured again next time."""
    with _locked():
        data = _load()
        mine = data.get(machine_key())
        if isinstance(mine, dict) and mine.pop(name, None) is not None:
            _save(data)


def _child(args: list[str]) -> int:
    """Runs in the child: prints the timing of the entries' matmuls (timing.Timing) as the last line of stdout."""
    print(json.dumps(measure(args).to_json()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
