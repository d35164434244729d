"""fastcore.threads.choose: a library user's thread count, chosen by timing the user's own first fit in two
children before TensorFlow starts; the children train and write nothing, and the parent then trains as usual."""
from __future__ import annotations

import os
import subprocess
import sys

SCRIPT = '''
import os, sys
import numpy as np
import fastcore, fastcore.threads

def main():
    import keras
    if sys.argv[1:] != ["--tag=a"]:   # a child runs main with this script's own arguments
        raise SystemExit(f"main got the arguments {sys.argv[1:]}")
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(2048, 16)).astype("float32"), rng.integers(0, 3, 2048)
    model = lambda: keras.Sequential([keras.Input((16,)), keras.layers.Dense(32, activation="relu"),
                                      keras.layers.Dense(3)])
    trainer = fastcore.Trainer(model, keras.optimizers.SGD(0.1),
                               loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), mode="xla")
    print("FIT STARTS", flush=True)
    trainer.fit(x, y, batch_size=32, epochs=1, verbose=False, run_dir=os.environ["RUN_DIR"])
    print("TRAINED", flush=True)

if __name__ == "__main__":
    {before}
    choice = fastcore.threads.choose(main)
    import tensorflow as tf
    print("CHOICE", choice.count, tf.config.threading.get_intra_op_parallelism_threads(), choice.why, flush=True)
    main()
'''


def run_script(tmp_path, before: str = "pass", run: str = "run") -> tuple[subprocess.CompletedProcess, str]:
    script = tmp_path / "train_script.py"
    script.write_text(SCRIPT.replace("{before}", before))
    run_dir = tmp_path / run
    env = {**os.environ, "FASTCORE_CACHE_DIR": str(tmp_path / "cache"), "TF_CPP_MIN_LOG_LEVEL": "3",
           "TMPDIR": str(tmp_path / "tmp"), "RUN_DIR": str(run_dir)}
    (tmp_path / "tmp").mkdir(exist_ok=True)
    done = subprocess.run([sys.executable, str(script), "--tag=a"], capture_output=True, text=True, env=env,
                          timeout=600, cwd=tmp_path)
    return done, str(run_dir)


def choice_line(done) -> list[str]:
    return next(line for line in done.stdout.splitlines() if line.startswith("CHOICE")).split(" ", 3)


def test_the_step_is_timed_in_two_children_then_set_here_and_cached(tmp_path):
    done, run_dir = run_script(tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    _, count, intra, why = choice_line(done)
    assert count in ("1", "None") and int(intra) == (1 if count == "1" else 0)   # set in this process
    assert "examples/s on 1 thread" in why and " on all, the step timed now" in why
    assert done.stdout.count("FIT STARTS") == 1 and done.stdout.count("TRAINED") == 1   # the children printed none
    assert os.listdir(run_dir) and os.path.exists(os.path.join(run_dir, "summary.json"))
    assert os.listdir(tmp_path / "tmp") == []                                            # the children left nothing
    again, _ = run_script(tmp_path, run="run2")
    assert again.returncode == 0, again.stderr[-2000:]
    if "noisy, not cached" not in why:
        assert "the step timed earlier (cached)" in choice_line(again)[3]
        assert choice_line(again)[1] == count


def test_after_tensorflow_started_every_core_is_kept_and_said(tmp_path):
    done, _ = run_script(tmp_path, before="import tensorflow as tf; tf.constant(1)")
    assert done.returncode == 0, done.stderr[-2000:]
    _, count, intra, why = choice_line(done)
    assert (count, intra) == ("None", "0") and "TensorFlow had already started" in why


def test_a_main_that_fails_in_the_child_keeps_every_core_and_says_why(tmp_path):
    script = SCRIPT.replace("{before}", "pass").replace(
        'print("FIT STARTS", flush=True)',
        'if os.environ.get("FASTCORE_THREADS_PROBE"): raise ValueError("no data here")')
    (tmp_path / "failing.py").write_text(script)
    env = {**os.environ, "FASTCORE_CACHE_DIR": str(tmp_path / "cache"), "RUN_DIR": str(tmp_path / "run")}
    done = subprocess.run([sys.executable, str(tmp_path / "failing.py"), "--tag=a"], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    _, count, intra, why = choice_line(done)
    assert (count, intra) == ("None", "0")
    assert why.startswith("all cores: main's step could not be timed on 1 thread(s)") and "no data here" in why
    assert "TRAINED" in done.stdout   # the run itself goes on


def test_a_lambda_is_refused_in_one_line():
    import pytest

    import fastcore.threads
    from fastcore.errors import UsageError
    with pytest.raises(UsageError, match="module-level function"):
        fastcore.threads.choose(lambda: None)


def _main_for_the_cache_test():
    """A module-level main for choose; never run (the children's timing is replaced)."""


def test_an_absurd_cached_answer_is_timed_again(monkeypatch, tmp_path):
    """A cached time outside PLAUSIBLE_SECONDS (a damaged or hand-edited cache) is not trusted."""
    import fastcore.threads as threads
    from fastcore.observe import calibrate
    monkeypatch.setenv("FASTCORE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(threads, "tensorflow_started", lambda: False)   # this test process runs TensorFlow
    monkeypatch.setattr(threads, "use", lambda count: None)
    timed = []
    monkeypatch.setattr(threads, "_time_in_child", lambda count, target: timed.append(count) or (1e-5 * (2 - count), None))
    key = threads.cache_key(threads._target(_main_for_the_cache_test))
    calibrate.store(key, {"one": 1e9, "all": 2e-5})   # one example every 30 years on one thread
    choice = threads.choose(_main_for_the_cache_test, verbose=False)
    assert timed == [1, 0] and choice.count == 1 and choice.why.endswith("the step timed now")
    assert calibrate.cached(key) == {"one": 1e-5, "all": 2e-5}
    assert threads.choose(_main_for_the_cache_test, verbose=False).why.endswith("the step timed earlier (cached)")
    assert timed == [1, 0]
