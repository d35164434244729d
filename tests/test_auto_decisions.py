"""Auto decisions (the machine's peak, precision="auto", mode="auto") are timed robustly and said honestly:
candidates interleaved, the fastest repeat kept, a noisy timing used but not cached, a near tie keeps the
default (said so), and a cached figure the run contradicts is measured again or dropped.

Timings are injected (fastcore.observe.timing.time_call and the calibration child's output), so every
assertion is deterministic; the candidates' calls themselves are real where a model is involved."""
import json
import math
import subprocess

import keras
import pytest

import fastcore
from fastcore.engine import autoprecision, pathchoice, precision
from fastcore.engine.precision import Precision
from fastcore.observe import calibrate, tensorboard, timing
from test_pathchoice import X, Y, bce, mlp   # the same small model and data


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch, tmp_path):
    """Each test starts from an empty cache (the session's is shared by every test)."""
    monkeypatch.setenv("FASTCORE_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def quiet(monkeypatch):
    """No neighbour: the CPUs' accounting is unknown, so only the injected repeats judge the noise."""
    monkeypatch.setattr(timing, "machine_cpu", lambda: None)


def scripted(monkeypatch, seconds: dict, order: list, calls_seen: dict):
    """time_call answers from `seconds` ({name: [per repeat]}) for the calls the next interleaved() gets, in the
    order asked (recorded in `order`); any other call (a probe) is timed for real."""
    real_interleaved, real_time_call = timing.interleaved, timing.time_call

    def interleaved(calls, *args, **kwargs):
        calls_seen.update({id(fn): name for name, fn in calls.items()})
        return real_interleaved(calls, *args, **kwargs)

    def time_call(fn, times=1):
        name = calls_seen.get(id(fn))
        if name is None:
            return real_time_call(fn, times)
        order.append(name)
        left = seconds[name]
        return left.pop(0) if len(left) > 1 else left[0]

    monkeypatch.setattr(timing, "interleaved", interleaved)
    monkeypatch.setattr(timing, "time_call", time_call)


# --- the timing itself --------------------------------------------------------------------------------------

def test_candidates_are_timed_in_interleaved_rounds_and_keep_their_fastest_repeat(monkeypatch, quiet):
    ran, order = [], []
    calls = {name: (lambda name=name: ran.append(name)) for name in ("a", "b", "c")}
    # the first figure of each: the call that sizes its repeats (all about as long as the longest: 1 call here)
    times = {"a": [0.3, 0.30, 0.20, 0.21, 0.25], "b": [0.3, 0.10, 0.11, 0.10, 0.12], "c": [0.5, 0.5, 0.45, 0.46, 0.47]}
    monkeypatch.setattr(timing, "time_call", lambda fn, n=1: order.append(ran[-1] if fn() is None else "") or
                        times[ran[-1]].pop(0))
    timed = timing.interleaved(calls, budget=60, least=3, most=4)
    assert ran[:3] == ["a", "b", "c"]                       # one warm-up call each (it compiles) ...
    assert order == ["a", "b", "c"] * 5                     # ... then A B C A B C, never A A A B B B
    assert timed.seconds == {"a": 0.20, "b": 0.10, "c": 0.45} and timed.rounds == 4
    assert timed.spread["b"] == pytest.approx(0.0) and timed.spread["a"] == pytest.approx(0.05)
    assert timed.noise is None
    assert timed.rates({"a": 100, "b": 100, "c": 90}) == pytest.approx({"a": 500, "b": 1000, "c": 200})


def test_repeats_far_apart_or_a_busy_machine_make_a_timing_noisy(monkeypatch):
    monkeypatch.setattr(timing, "machine_cpu", lambda: None)
    times = {"a": [0.1, 0.10, 0.20, 0.13], "b": [0.1, 0.10, 0.10, 0.10]}   # a's two fastest 30% apart
    monkeypatch.setattr(timing, "time_call", lambda fn, n=1: times[fn()].pop(0))
    timed = timing.interleaved({"a": lambda: "a", "b": lambda: "b"}, budget=60, least=3, most=3)
    assert timed.noise == "a repeats 30% apart"
    readings = iter([(100.0, 10.0, 0.0), (103.0, 11.0, 2.0)])   # others: 3 - 1 CPU-seconds in 2 s on 2 CPUs
    monkeypatch.setattr(timing, "machine_cpu", lambda: next(readings))
    monkeypatch.setattr(timing.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(timing, "time_call", lambda fn, n=1: 0.1)
    steady = timing.interleaved({"a": lambda: None}, budget=60, least=3, most=3)
    assert steady.spread["a"] == 0 and steady.busy == pytest.approx(0.5)
    assert steady.noise == "other work took 50% of the CPUs"


def test_a_candidate_far_behind_leaves_the_race_and_its_noise_decides_nothing(monkeypatch, quiet):
    times = {"fast": [0.5, 0.5, 0.5, 0.5], "slow": [0.5, 2.5, 4.5, 3.0]}   # first: the sizing call (0.5 s each)
    order = []
    monkeypatch.setattr(timing, "time_call", lambda fn, n=1: order.append(fn()) or times[order[-1]].pop(0))
    timed = timing.interleaved({"fast": lambda: "fast", "slow": lambda: "slow"}, budget=60, least=3, most=3,
                               behind=2.0)
    assert order == ["fast", "slow"] + ["fast", "slow", "fast", "fast"] and timed.racing == ("fast",)
    assert math.isinf(timed.spread["slow"]) and timed.noise is None


def test_a_short_call_is_repeated_within_one_timed_repeat(monkeypatch, quiet):
    asked = []
    monkeypatch.setattr(timing, "time_call", lambda fn, n=1: asked.append(n) or 0.001)
    timing.interleaved({"tiny": lambda: None}, budget=60, least=3, most=3)
    assert asked == [1, 20, 20, 20]   # 1 ms: sized once to 20 calls per repeat (REPEAT_SECONDS), then 3 rounds


def test_every_candidates_repeat_lasts_about_as_long_as_the_longest_call(monkeypatch, quiet):
    """The fastest of short windows is a luckier draw than the fastest of long ones: the race is kept even."""
    asked = {"one step": [], "k steps": []}
    seconds = {"one step": 0.04, "k steps": 0.5}

    def time_call(fn, n=1):
        name = fn()
        asked[name].append(n)
        return seconds[name]
    monkeypatch.setattr(timing, "time_call", time_call)
    timing.interleaved({name: (lambda name=name: name) for name in seconds}, budget=60, least=3, most=3)
    assert asked["one step"] == [1] + [12] * 3 and asked["k steps"] == [1] * 4   # 12 x 40 ms ~ 0.5 s


# --- the machine's peak -----------------------------------------------------------------------------------

LARGE = (calibrate.LARGE,) * 3
ENTRIES = [calibrate.entry("float32", p, LARGE) for p in calibrate.PATHS]


def fake_child(monkeypatch, gflops: float, spread: float = 0.01, busy: float = 0.0) -> list:
    """The calibration child answers with a timing of `gflops` on every entry asked, repeats `spread` apart."""
    asked = []

    def run(argv, **kwargs):
        names = argv[3:]
        asked.append(names)
        timed = timing.Timing({n: calibrate.flop(n) / 1e9 / gflops for n in names}, dict.fromkeys(names, spread),
                              tuple(names), 3, busy)
        return subprocess.CompletedProcess(argv, 0, json.dumps(timed.to_json()) + "\n", "")
    monkeypatch.setattr(calibrate.children, "run", run)
    return asked


def stored() -> dict:
    return calibrate._load().get(calibrate.machine_key(), {})


def test_a_noisy_peak_is_used_for_the_run_but_not_cached(monkeypatch):
    asked = fake_child(monkeypatch, 40.0, spread=0.3)
    top = calibrate.ceiling("float32")
    assert top["gflops"] == 40.0 and not top["cached"]
    assert "noisy (float32/xla/2048x2048x2048 repeats 30% apart), not cached" in top["status"]
    assert not any(name in stored() for name in ENTRIES)
    calibrate.ceiling("float32")
    assert len(asked) == 2   # nothing was cached: measured again
    fake_child(monkeypatch, 40.0, busy=0.4)
    assert "noisy (other work took 40% of the CPUs), not cached" in calibrate.ceiling("float32")["status"]
    quiet = fake_child(monkeypatch, 40.0)
    assert calibrate.ceiling("float32")["status"].startswith("measured now in ")
    assert calibrate.ceiling("float32")["status"] == "cached" and len(quiet) == 1
    assert all(stored()[name]["gflops"] == 40.0 for name in ENTRIES)


def test_a_cached_peak_the_run_beats_is_measured_again(monkeypatch):
    calibrate.store(ENTRIES[0], {"gflops": 14.0})
    calibrate.store(ENTRIES[1], {"gflops": 12.0})
    asked = fake_child(monkeypatch, 40.0)
    below = tensorboard.utilisation(1e6, 10_000.0, "float32")   # 10 GFLOP/s: agrees with the cached 14
    assert not asked and below["peak"]["status"] == "cached" and below["utilisation"] == pytest.approx(10 / 14)
    stopped = tensorboard.utilisation(1e6, 20_000.0, "float32", measure=False)   # 20 GFLOP/s > 14
    assert not asked and "dropped from the cache (a stopped run does not measure)" in stopped["peak"]["status"]
    assert stopped["utilisation"] == 1.0 and stopped["peak"]["measured_low"] and not stored()
    for name in ENTRIES:
        calibrate.store(name, {"gflops": 14.0})
    out = tensorboard.utilisation(1e6, 20_000.0, "float32")
    assert asked == [ENTRIES] and out["peak"]["gflops"] == 40.0 and out["utilisation"] == pytest.approx(0.5)
    assert out["peak"]["status"].startswith("the run's 20.0 GFLOP/s beat the cached peak 14: measured now in ")
    assert all(stored()[name]["gflops"] == 40.0 for name in ENTRIES)
    line = tensorboard.final_lines({**out, "flops_per_example": 1e6, "step_time_ms": 1.0})[0]
    assert line.startswith("utilisation 50%") and "beat the cached peak 14" in line


def test_a_contradicted_peak_measured_again_noisily_is_dropped_from_the_cache(monkeypatch):
    for name in ENTRIES:
        calibrate.store(name, {"gflops": 14.0})
    fake_child(monkeypatch, 30.0, spread=0.5)
    out = tensorboard.utilisation(1e6, 20_000.0, "float32")
    assert out["peak"]["gflops"] == 30.0 and "noisy" in out["peak"]["status"]
    assert not any(name in stored() for name in ENTRIES)   # the contradicted 14 is not kept either


def test_the_precision_proposal_says_when_its_peaks_were_noisy(monkeypatch):
    fake_child(monkeypatch, 40.0, spread=0.5)
    choice = precision.resolve("auto", xla=True)
    assert choice.name == "float32" and "noisy, not cached" in choice.reason


# --- precision="auto" -------------------------------------------------------------------------------------

PROPOSAL = Precision("bfloat16", "auto: the peaks say so")
CANDIDATES = ("float32", "bfloat16", autoprecision.GRAPH_BF16)


def step_timing(seconds: dict, spread: float = 0.01) -> timing.Timing:
    return timing.Timing(seconds, dict.fromkeys(seconds, spread), tuple(seconds), 3, 0.0)


def test_precision_near_tie_keeps_float32_and_says_so():
    timed = step_timing({"float32": 1.0, "bfloat16": 1 / 1.03, autoprecision.GRAPH_BF16: 1.5})
    choice = autoprecision.confirm(PROPOSAL, "step/tie", lambda: timed, 1000, CANDIDATES)
    assert choice.name == "float32" and "a near tie keeps float32" in choice.reason
    assert "bfloat16 1,030" in choice.reason and "(timed now in " in choice.reason
    assert calibrate.cached("step/tie") == pytest.approx({"float32": 1000, "bfloat16": 1030,
                                                          autoprecision.GRAPH_BF16: 1000 / 1.5})
    again = autoprecision.confirm(PROPOSAL, "step/tie", lambda: pytest.fail("cached: not timed again"), 1000,
                                  CANDIDATES)
    assert again.name == "float32" and again.reason.endswith("(cached)")


def test_a_noisy_precision_timing_decides_this_run_and_is_not_cached():
    timed = step_timing({"float32": 1.0, "bfloat16": 0.5, autoprecision.GRAPH_BF16: 0.8}, spread=0.4)
    choice = autoprecision.confirm(PROPOSAL, "step/noisy", lambda: timed, 1000, CANDIDATES)
    assert choice.name == "bfloat16" and choice.mode is None
    assert "noisy (float32 repeats 40% apart), not cached" in choice.reason
    assert calibrate.cached("step/noisy") is None


def test_precision_auto_times_its_candidates_interleaved_on_the_real_step(monkeypatch, quiet):
    monkeypatch.setattr(autoprecision, "resolve", lambda name, xla, graph_bf16: PROPOSAL)
    order, seen = [], {}
    scripted(monkeypatch, {"float32": [0.100], "bfloat16": [0.097], autoprecision.GRAPH_BF16: [0.2]}, order, seen)
    trainer = fastcore.Trainer(mlp, keras.optimizers.SGD(0.01), loss=bce(), precision="auto", mode="xla",
                               steps_per_call=2)
    trainer.build(trainer.feed(X, Y, batch_size=64))
    assert order[:6] == list(CANDIDATES) * 2
    assert trainer.precision.name == "float32" and "a near tie keeps float32" in trainer.precision.reason


def test_a_cached_precision_timing_the_run_contradicts_is_dropped_and_timed_again():
    calibrate.store("step/k", {"float32": 1000.0, "bfloat16": 500.0})
    ran = Precision("float32", "auto: ...")
    assert autoprecision.recheck(ran, "step/k", {"batch_size": 32, "step_time_ms": 40.0}) is None   # 800 ex/s
    line = autoprecision.recheck(ran, "step/k", {"batch_size": 32, "step_time_ms": 10.0})           # 3,200 ex/s
    assert line == ("auto precision: this run's float32 step ran 3,200 ex/s, the cached timing said 1,000: "
                    "dropped from the cache, timed again next run")
    assert calibrate.cached("step/k") is None
    timed = step_timing({"float32": 0.01, "bfloat16": 0.02})
    again = autoprecision.confirm(PROPOSAL, "step/k", lambda: timed, 32, ("float32", "bfloat16"))
    assert "timed now" in again.reason and calibrate.cached("step/k")["float32"] == pytest.approx(3200)


# --- mode="auto" ------------------------------------------------------------------------------------------

def test_path_near_tie_keeps_the_default_and_says_so(monkeypatch):
    calibrate.store("path/tie", {"xla/1": 100.0, "graph/1": 104.0, "xla/K": 100.0, "graph/K": 50.0})
    path = pathchoice.choose(None, Precision("float32", "t"), None, 32, 8, "tie")
    assert (path.mode, path.steps_per_call) == ("xla", 8)
    assert "graph/1 within 5%: a near tie keeps xla/8, listed first (cached)" in path.reason


def test_a_noisy_path_timing_is_used_but_not_cached(monkeypatch):
    work = {"xla/1": 32, "graph/1": 32}
    timed = timing.Timing({"xla/1": 0.002, "graph/1": 0.001}, {"xla/1": 0.01, "graph/1": 0.3},
                          ("xla/1", "graph/1"), 3, 0.0)
    monkeypatch.setattr(pathchoice, "measure", lambda *args: (timed, work))
    path = pathchoice.choose(None, Precision("float32", "t"), None, 32, 1, "noisy")
    assert (path.mode, path.steps_per_call) == ("graph", 1)
    assert "noisy (graph/1 repeats 30% apart), not cached" in path.reason
    assert calibrate.cached("path/noisy") is None


def test_path_auto_times_interleaved_on_the_real_step_and_follows_the_injected_timing(monkeypatch, quiet):
    order, seen = [], {}
    # one call of each: xla/1 and graph/1 train 32 examples, the K-step ones 32 x timed K
    scripted(monkeypatch, {"xla/1": [0.04], "graph/1": [0.025], "xla/K": [0.5], "graph/K": [0.5]}, order, seen)
    trainer = fastcore.Trainer(mlp, keras.optimizers.SGD(0.01), loss=bce())
    trainer.feed(X, Y, batch_size=32)
    path = trainer._paths[32]
    assert order == ["xla/1", "graph/1", "xla/K", "graph/K"] * (1 + pathchoice.MOST)   # sizing, then A B C D A B C D ...
    assert (path.mode, path.steps_per_call) == ("graph", 1) and "timed now" in path.reason
    assert calibrate.cached(f"path/{path.key}") == path.rates


def test_a_cached_path_timing_the_run_contradicts_is_dropped_and_said(monkeypatch):
    names = ("xla/1", "graph/1", "xla/K", "graph/K")
    timed = timing.Timing(dict.fromkeys(names, 1.0), dict.fromkeys(names, 0.2), names, 3, 0.0)   # noisy
    monkeypatch.setattr(pathchoice, "measure", lambda *args: (timed, dict.fromkeys(names, 32)))
    trainer = fastcore.Trainer(mlp, keras.optimizers.SGD(0.01), loss=bce())
    trainer.feed(X, Y, batch_size=32)
    key = f"path/{trainer._paths[32].key}"
    calibrate.store(key, dict.fromkeys(names, 1e9))   # a timing far above anything this step runs
    for path in calibrate.PATHS:   # a cached peak the run cannot contradict: no calibration child
        calibrate.store(calibrate.entry("float32", path, LARGE), {"gflops": 10_000.0})
    again = fastcore.Trainer(mlp, keras.optimizers.SGD(0.01), loss=bce())
    result = again.fit(X, Y, batch_size=32, epochs=4, verbose=False)   # 3 steady calls of 16 steps
    assert again.path.reason.endswith("(cached)")
    [line] = result.summary["rechecked"]
    assert line.startswith("auto path: this run's xla/16 step ran ") and "the cached timing said 1,000,000,000" in line
    assert calibrate.cached(key) is None   # the next run times the paths again
