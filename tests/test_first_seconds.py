"""A run speaks from its first second: the first line at once, every slow phase announced and timed, and the
`--threads auto` choice honest about noise and re-checked when a run contradicts it."""
from __future__ import annotations

import gc
import io
import os
import pathlib
import re
import subprocess
import sys
import threading
import time

from fastcore.cli import plan as planning, threads
from fastcore.observe import calibrate, phases

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Bounds from measurement (2-core Xeon, the README command, fresh cache): the first line came 0.3-0.5 s after
# the command and the longest unannounced silence was 1.2 s (a phase is said after ANNOUNCE_AFTER = 1 s).
FIRST_LINE_SECONDS = 2.0
SILENT_SECONDS = 3.0


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_quick_phase_says_nothing_and_a_slow_one_is_announced_then_timed():
    out = io.StringIO()
    with phases.speaking(out):
        with phases.phase("quick", delay=0.5):
            pass
        with phases.phase("slow", delay=0.05) as p:
            time.sleep(0.2)
            p.note = "cached"
    lines = out.getvalue().splitlines()
    assert lines[0] == "slow ..." and re.fullmatch(r"slow: 0\.[2-9] s \(cached\)", lines[1]), lines
    assert len(lines) == 2


def test_on_a_terminal_the_time_ends_the_announcing_line_and_a_nested_phase_breaks_it():
    out = Terminal()
    with phases.speaking(out):
        with phases.phase("outer", delay=0):
            with phases.phase("inner", delay=0):
                time.sleep(0.01)
    assert re.fullmatch(r"outer ...\ninner ... 0\.0 s\nouter: 0\.0 s\n", out.getvalue()), out.getvalue()


def test_a_phase_stopped_by_an_error_says_so_and_nothing_speaks_without_a_listener(capsys):
    out = io.StringIO()
    try:
        with phases.speaking(out), phases.phase("work", delay=0):
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    assert out.getvalue() == "work ...\nwork: stopped\n"
    with phases.phase("unheard", delay=0):
        pass
    assert capsys.readouterr().out == ""


def _timed(count, best, noise):
    return {1: (best, noise), 0: (2 * best, noise)}[count]


def test_a_noisy_thread_timing_is_used_but_not_cached(monkeypatch):
    config = planning.RunConfig("mnist")
    monkeypatch.setattr(threads, "_time_in_child", lambda count, fields, scratch: _timed(count, 1e-5, "step repeats 100% apart"))
    count, why = threads.choose(config)
    assert count == 1 and why.endswith("the step timed now, noisy, not cached")
    assert calibrate.cached(threads.cache_key(config)) is None
    monkeypatch.setattr(threads, "_time_in_child", lambda count, fields, scratch: _timed(count, 1e-5, None))
    assert threads.choose(config)[1].endswith("the step timed now")
    assert calibrate.cached(threads.cache_key(config)) == {"one": 1e-5, "all": 2e-5}


def test_a_run_far_slower_than_its_cached_thread_timing_forgets_it():
    config = planning.RunConfig("mnist")
    calibrate.store(threads.cache_key(config), {"one": 1e-5, "all": 2e-5})   # 100,000 ex/s on one thread
    assert threads.recheck(config, 1, 80_000.0) is None
    assert calibrate.cached(threads.cache_key(config)) is not None
    line = threads.recheck(config, 1, 30_000.0)
    assert line == ("threads: this run's 30,000 examples/s is under 50% of the 100,000 timed earlier; "
                    "the next run times the thread count again")
    assert calibrate.cached(threads.cache_key(config)) is None


def test_the_readme_command_on_a_fresh_cache_speaks_within_seconds_and_never_goes_silent(tmp_path, data_dir):
    """README's main command as a user runs it (a log file: stdout is a pipe), every line time-stamped."""
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"&& python -m fastcore\.train (.*?)\n", readme).group(1).split()
    command = [data_dir if arg == "../shared/data" else arg for arg in command]
    env = {**os.environ, "FASTCORE_CACHE_DIR": str(tmp_path / "fresh-cache"), "PYTHONUNBUFFERED": "1"}
    # The stamps are taken in this (test) process: a full garbage collection in it (seconds, late in a long
    # session) would stall the reader and read as the command's silence. CI once saw 5.2 s after a line that
    # the same command run alone follows within 0.1 s. Collection waits until the command ends.
    gc.disable()
    try:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "fastcore.train", *command, "--logdir", str(tmp_path / "runs")],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
        stamped = []
        reader = threading.Thread(target=lambda: stamped.extend((time.perf_counter() - start, line.rstrip("\n"))
                                                                for line in proc.stdout))
        reader.start()
        proc.wait(timeout=900)
        reader.join()
    finally:
        gc.enable()
    text = "\n".join(line for _, line in stamped)
    assert proc.returncode == 0, text
    assert stamped[0][0] < FIRST_LINE_SECONDS, stamped[0]
    assert stamped[0][1] == "higgs: starting TensorFlow ..."
    for (before, line), (after, _) in zip([(0.0, "(the command)"), *stamped], stamped):
        if after - before > SILENT_SECONDS:
            assert line.endswith(" ..."), f"{after - before:.1f} s of silence after {line!r}:\n{text}"
    announced = {line[:-4] for _, line in stamped if line.endswith(" ...")}
    for name in announced:   # each announced phase is timed when it ends
        assert any(re.fullmatch(re.escape(name) + r": \d+\.\d s.*", line) for _, line in stamped), (name, text)
    assert any(line.startswith("--threads auto: timing the step") for line in announced), text   # a fresh cache times


def test_a_resumed_run_keeps_the_thread_count_it_used(tmp_path):
    """--deterministic's bit-identical resume needs the same arithmetic: auto reads the count, times nothing."""
    config = planning.RunConfig("mnist", logdir=str(tmp_path), run_name="r", resume=True)
    assert threads.resumed_count(config) is None   # no summary.json (e.g. after a SIGKILL): timed or cached
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "summary.json").write_text('{"intra_op_threads": 1}')
    assert threads.resumed_count(config) == 1
    (tmp_path / "r" / "summary.json").write_text('{"intra_op_threads": %d}' % len(os.sched_getaffinity(0)))
    assert threads.resumed_count(config) == 0   # all cores
