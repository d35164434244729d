"""Every script in examples/ runs as a user would run it, on the real data, and meets its stated target.

The examples run as subprocesses, two at a time (each is mostly single-threaded start-up, compiling and
Python; two overlap well on a 2-core machine), all started when the first selected one is asked for.
"""
from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT = 300
PREFLIGHT = "pre-flight: compiled and eager agree on the first batch"

# example -> the final line it prints when it meets its target (slowest first: they start in this order)
LAST_LINE = {
    "distributed_custom_step.py": r"^2 replicas: twin PASS \(worst relative difference \S+\); eval accuracy 0\.\d+; "
                                  r"replica spread after training 0\.0 \(target",
    "higgs_custom_step.py": r"^eval accuracy: fastcore 0\.\d+  keras fit 0\.\d+  gap [+-]0\.\d+ \(target",
    "gan_keras_guide.py": r"^last epoch's mean d_loss: fastcore \d\.\d{3}  keras fit \d\.\d{3}; g_loss: fastcore \d\.\d{3}  "
                          r"keras fit \d\.\d{3} \(target: d_loss in \[0\.2, 0\.68\], g_loss in \[0\.5, 3\.0\] for both; "
                          r"verify passes\)$",
    "vae_keras_example.py": r"^last epoch's mean total loss: fastcore \d+\.\d\d  keras fit \d+\.\d\d  gap [+-]\d\.\d\d% "
                            r"\(untrained \d+\.\d\d; target: \|gap\| <= 4%, below untrained; verify passes\)$",
    "gan_two_optimizers.py": r"^generated mean \(.*\) std .*distance to \(2, 2\) 0\.\d+ .*"
                             r"iterations \{'gen': 2000, 'disc': 2000\}",
    "actor_critic_cartpole.py": r"^episodes until the last 10 average >= 195: fastcore \d+  keras \d+; ms per update: "
                                r"fastcore \S+  keras \S+ \(target: both <= 300, fastcore <= keras \+ 150\)$",
    "text_classifier_varying.py": r"^test accuracy: fastcore 0\.\d+  keras fit 0\.\d+  gap [+-]0\.\d+; compiled shapes "
                                  r"\{'train': 3, 'eval': \d+\} \(traces \{'train': 3, 'eval': \d+\}\) \(target: "
                                  r"fastcore >= 0\.65, at most 0\.03 below keras, 3 training shapes\)$",
    "bn_convnet_fashion.py": r"^test accuracy: fastcore 0\.\d+  keras fit 0\.\d+  gap [+-]0\.\d+; examples/s: "
                             r"fastcore [\d,]+  keras fit [\d,]+ \(target: fastcore >= 0\.78, at most 0\.03 below keras\)$",
    "cnn_tfrecord.py": r"^eval accuracy 0\.\d+ on Fashion-MNIST test\[:2000\] \(target >= 0\.8\)$",
    "mnist_keras_free.py": r"^eval accuracy 0\.\d+ on MNIST test\[8000:\] \(target >= 0\.9\)$",
    "linear_keras_subclass.py": r"^W \d\.\d+ b \d\.\d+ \|W-3\| 0\.0\d+ \|b-2\| 0\.0\d+ \(target <= 0\.05\)$",
    "variables_module.py": r"^steps \d+: W \d\.\d+ b \d\.\d+ \|W-3\| 0\.0\d+ \|b-2\| 0\.0\d+ \(target <= 0\.05\)$",
    "sine_sequential_functional.py": r"^sequential eval mse \S+  functional eval mse \S+ \(target <= 0\.001\)$",
}


def test_every_example_is_tested():
    assert sorted(p.name for p in (ROOT / "examples").glob("*.py")) == sorted(LAST_LINE)


def _run(script: str, env: dict) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([sys.executable, str(ROOT / "examples" / script)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as e:
        return subprocess.CompletedProcess(e.cmd, -1, e.stdout or "", f"timed out after {TIMEOUT} s")


@pytest.fixture(scope="session")
def example_runs(request, data_dir, tmp_path_factory):
    """Starts every selected example at once (two at a time); {script: Future of CompletedProcess}."""
    env = {**os.environ, "FASTCORE_DATA_DIR": data_dir, "TF_CPP_MIN_LOG_LEVEL": "3",
           "FASTCORE_CACHE_DIR": str(tmp_path_factory.mktemp("examples-cache"))}
    selected = {item.callspec.params["script"] for item in request.session.items
                if hasattr(item, "callspec") and "script" in item.callspec.params}
    pool = ThreadPoolExecutor(max_workers=2)
    runs = {script: pool.submit(_run, script, env) for script in LAST_LINE if script in selected}
    yield runs
    pool.shutdown(wait=True)


@pytest.mark.parametrize("script", list(LAST_LINE))
def test_example_meets_its_target(script, example_runs):
    done = example_runs[script].result()
    out = done.stdout if isinstance(done.stdout, str) else done.stdout.decode(errors="replace")
    lines = out.strip().splitlines()
    tail = "\n".join(lines[-15:]) + "\n--- stderr ---\n" + "\n".join(str(done.stderr).strip().splitlines()[-15:])
    assert done.returncode == 0, f"{script} exited {done.returncode}:\n{tail}"
    assert any(line.startswith(PREFLIGHT) for line in lines), f"{script} printed no passing pre-flight line:\n{tail}"
    assert re.search(LAST_LINE[script], lines[-1]), f"{script}'s last line is not its metric:\n{tail}"
