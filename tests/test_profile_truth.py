"""--profile-steps tells the truth: the Profile tab sees the run's own compiled K-step call (one step marker per
call), so its step time / K is the run's step; the window reported is the window traced; profiled calls stay
out of the `perf/*` scalars and the steady figures, and a short profiled run still says what it measured."""
from __future__ import annotations

import json

import pytest

from helpers import cli
from test_observability import TensorBoard, run_module

from fastcore.observe import doctor

# Batch 256: an active profiler records ~130 events per optimizer step on XLA's CPU runtime (each kernel and
# thread-pool task, counted in the trace) at any host tracer level. The CPU time of the same call with the
# profiler on over off (interleaved) was 1.26x at the default batch 32 (a ~0.4 ms step) and 1.10x at batch 256.
# The run states that cost (`profile.tracing_cost`); what is tested is that the Profile tab times the run's
# own call, and that per step it is the steady step plus that cost.
K = 5        # steps per call, given: the window's arithmetic below depends on it
CALLS = 20   # train[:25600] / batch 256 = 100 steps
RUN = ["--dataset", "fashion_mnist", "--train-split", "train[:25600]", "--eval-split", "test[:1000]", "--epochs", "1",
       "--batch-size", "256", "--steps-per-call", str(K), "--precision", "float32", "--threads", "all",
       "--profile-steps", "18:48", "--run-name", "fm"]
TRACED = (16, 50)   # the whole calls holding steps 18..48: calls 4 to 10


@pytest.fixture(scope="module")
def fashion(tmp_path_factory, data_dir):
    """A short Fashion-MNIST CLI run with a profile window of 7 calls, and TensorBoard serving its logdir."""
    logdir = tmp_path_factory.mktemp("truth") / "logs"
    cache = {"FASTCORE_CACHE_DIR": str(tmp_path_factory.getbasetemp() / "cache")}
    result = run_module("fastcore.train", *RUN, "--data-dir", data_dir, "--logdir", str(logdir), env=cache)
    assert result.returncode == 0, result.stderr
    summary = json.loads((logdir / "fm" / "summary.json").read_text())
    board = TensorBoard(logdir)
    try:
        board.wait_ready()
        yield board, logdir, result, summary
    finally:
        board.stop()


def served(board, tool: str) -> list[dict]:
    """The tables the profile plugin serves for the run's one trace and host."""
    (run,) = board.poll(lambda: board.get("/data/plugin/profile/runs"), lambda r: bool(r))
    (host,) = board.get("/data/plugin/profile/hosts", run=run, tag=tool)
    return board.get("/data/plugin/profile/data", run=run, tag=tool, host=host["hostname"])


def step_table(tables: list[dict]) -> dict:
    return next(t for t in tables if "steptime_ms_average" in t.get("p", {}))


def test_the_profile_tabs_step_time_is_the_runs_step(fashion):
    board, _, result, summary = fashion
    overview = step_table(served(board, "overview_page"))
    per_call = float(overview["p"]["steptime_ms_average"])   # the Overview's Average Step Time
    prof = summary["profile"]
    assert prof["steps_per_call"] == summary["steps_per_call"] == K
    # One marker per call of K steps, spanning its input wait and the call: the Profile tab times the very calls
    # the run timed while tracing...
    assert per_call == pytest.approx(prof["call_ms_mean"], rel=0.2), (per_call, prof["call_ms_mean"])   # means both
    # ...and, per step, near the run's untraced steady step over the same span: each traced step was a one-step
    # call of its own before, 5-6x the steady step at batch 32. What is left is the profiler's own cost, which
    # the run states: 1.16-1.36x at batch 32 and 1.10-1.31x at batch 256 on a quiet 2-core Xeon, 1.83x once on a
    # busy CI machine. The bound is 3x: it still fails on one-step calls (5-6x), and does not time the machine.
    assert per_call / K < 3 * prof["steady_step_ms"], (per_call / K, prof["steady_step_ms"])
    # No time the profiling itself made: the per-step Python of one-step calls was 30-44% 'All Others'.
    assert float(overview["p"]["other_time_ms_avg"]) < 0.25 * per_call, overview["p"]
    # Said so: the final line and summary.json give the per-step figure as call / K, and what tracing costs.
    assert prof["step_time_ms"] == pytest.approx(prof["call_ms"] / K)
    assert prof["tracing_cost"] == pytest.approx(prof["step_time_ms"] / prof["steady_step_ms"])
    assert f"the Profile tab's step is one call of {K} steps, so per step = its step time / {K}" in result.stdout
    assert (f"{prof['step_time_ms']:.3f} ms per step, input wait included; untraced steady "
            f"{prof['steady_step_ms']:.3f} ms per step: tracing costs {prof['tracing_cost']:.2f}x") in result.stdout
    assert f"one compiled call of {K} steps" in prof["step_time_is"]


def test_the_window_reported_is_the_window_traced(fashion):
    board, logdir, result, summary = fashion
    prof = summary["profile"]
    assert prof["asked"] == [18, 48] and prof["steps"] == list(TRACED)
    assert prof["markers"] == list(range(TRACED[0], TRACED[1], K)) and prof["calls"] == 7
    assert prof["traced_steps"] == list(range(TRACED[0], TRACED[1] + 1))
    assert f"profile of steps 16-50 (asked 18-48: whole calls of {K} steps): {prof['dir']}" in result.stdout
    # The trace holds one marker per traced call, numbered by the call's first step, and nothing outside.
    rows = step_table(served(board, "input_pipeline_analyzer"))["rows"]
    numbers = [int(row["c"][0]["v"].split()[-1]) for row in rows]
    assert numbers and set(numbers) <= set(prof["markers"]), numbers   # (the plugin may drop a partial first/last)
    # The doctor names the same steps and reads the same step time.
    out = run_module("fastcore.profile", "doctor", str(logdir)).stdout
    assert f"steps 16-50 in 7 calls of {K}" in out and "steps 18-48" not in out
    assert f"is one compiled call of {K} steps (one step marker per call)" in out


def test_perf_scalars_leave_out_the_compiling_and_the_profiled_calls(fashion):
    _, logdir, _, summary = fashion
    points = {tag: scalar_steps(logdir / "fm" / "train", tag)
              for tag in ("batch_loss", "perf/step_time_ms", "perf/examples_per_sec")}
    assert points["batch_loss"] == [K * (i + 1) for i in range(CALLS)]   # every call has its loss
    profiled_ends = {first + K - 1 for first in summary["profile"]["markers"]}
    steady_ends = [step for step in points["batch_loss"] if step != K and step not in profiled_ends]
    assert points["perf/step_time_ms"] == points["perf/examples_per_sec"] == steady_ends
    assert summary["steady_calls"] == len(steady_ends) == CALLS - 1 - 7


def scalar_steps(folder, tag: str) -> list[int]:
    """The x (optimizer step) of each point of `tag` in a TensorBoard run folder, read with TensorBoard's loader."""
    from tensorboard.backend.event_processing import event_file_loader
    files = sorted(p.name for p in folder.iterdir() if ".tfevents." in p.name)
    return [event.step for name in files for event in event_file_loader.EventFileLoader(str(folder / name)).Load()
            for value in event.summary.value if value.tag == tag]


SHORT = ["--dataset", "fashion_mnist", "--train-split", "train[:3200]", "--eval-split", "test[:500]", "--epochs", "1",
         "--steps-per-call", "25", "--precision", "float32", "--threads", "all"]   # 100 steps of batch 32: 4 calls


def test_a_short_profiled_run_reports_steady_throughput_from_its_unprofiled_calls(data_dir, tmp_path):
    code, out, err = cli(*SHORT, "--profile-steps", "30:60", "--data-dir", data_dir, "--logdir", str(tmp_path),
                         "--run-name", "r")
    assert code == 0, err
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["compiled_calls"] == 4 and summary["profile"]["calls"] == 2 and summary["steady_calls"] == 1
    assert summary["examples_per_sec"] > 0 and "examples/s steady" in out


def test_a_run_whose_other_calls_were_all_profiled_says_so(data_dir, tmp_path):
    code, out, err = cli(*SHORT, "--profile-steps", "30:100", "--data-dir", data_dir, "--logdir", str(tmp_path),
                         "--run-name", "r")
    assert code == 0, err
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["steady_calls"] == 0 and "examples_per_sec" not in summary
    prof = summary["profile"]
    assert prof["steps"] == [26, 100] and prof["calls"] == 3
    line = next(line for line in out.splitlines() if line.startswith("100 steps in "))
    assert line.startswith("100 steps in 4 compiled calls: the first is never counted as steady and the others were "
                           "profiled, so no steady-state throughput figure; under the profiler ")
    assert f"{prof['examples_per_sec']:,.0f} examples/s, {prof['step_time_ms']:.3f} ms/step" in line
    assert "one compiled call" not in out


def test_profile_notes_say_what_works_offline():
    figures = doctor.served_figures({
        "overview_page": json.dumps([{"p": {"steptime_ms_average": "30.0"}, "cols": [], "rows": [{}, {}, {}]},
                                     {"p": {}, "cols": [{"id": "tip_type"}], "rows": [{}] * 7}]),
        "framework_op_stats": json.dumps([{"p": {}, "cols": [], "rows": [{}] * 10}, {"p": {}, "rows": [{}] * 9}])})
    assert figures == {"step_ms": 30.0, "markers": 3, "recommendations": 7, "op_rows": 10}
    notes = doctor.profile_notes(["trace_viewer@", "overview_page", "framework_op_stats"], figures,
                                 {"calls": 3, "steps_per_call": 25, "steady_step_ms": 1.1})
    assert notes[0].startswith("the Profile tab's Average Step Time, 30.0 ms, is one compiled call of 25 steps")
    assert "1.200 ms per optimizer step; the run's untraced steady step: 1.100 ms" in notes[0]
    assert notes[1] == ("offline, this trace shows: the Trace Viewer; the Overview's Performance Summary (Average "
                        "Step Time 30.0 ms over 3 step markers) and Run Environment")
    assert "the Overview's Step-time Graph and its 7 recommendations" in notes[2]
    assert "Framework Op Stats' charts and table (10 rows)" in notes[2]
