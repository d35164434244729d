"""Checkpoints: a run killed with SIGKILL and resumed ends bit-identical to an uninterrupted run."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from conftest import ROOT

RUN = ["--dataset", "higgs", "--train-split", "train[:10000]", "--eval-split", "train[10000:]", "--epochs", "12",
       "--precision", "float32",
       "--dropout", "0.3", "--l2", "1e-4", "--steps-per-call", "4", "--checkpoint-every", "20"]


def start(data_dir, logdir, name, *extra):
    return subprocess.Popen([sys.executable, "-m", "fastcore.train", *RUN, "--data-dir", data_dir, "--logdir",
                             str(logdir), "--run-name", name, *extra], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def final_weights(run_dir):
    path = tf.train.latest_checkpoint(os.path.join(run_dir, "checkpoints"))
    reader = tf.train.load_checkpoint(path)
    names = sorted(n for n, _ in tf.train.list_variables(path) if n.startswith("models/"))
    assert names, "no model variables in the checkpoint"
    return path, {n: reader.get_tensor(n) for n in names}


def kill_after_first_checkpoint(proc, checkpoint_dir, delay):
    deadline = time.time() + 120
    while not tf.train.latest_checkpoint(checkpoint_dir):
        assert proc.poll() is None, f"finished before it could be killed: {proc.communicate()}"
        assert time.time() < deadline
        time.sleep(0.02)
    time.sleep(delay)   # somewhere later: mid-call, mid-evaluation or mid-save
    assert proc.poll() is None, "the run ended before the kill: make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return int(tf.train.latest_checkpoint(checkpoint_dir).rsplit("-", 1)[1])


@pytest.mark.parametrize("delay", [0.0, 0.7])
def test_sigkill_and_resume_is_bit_identical_under_deterministic(data_dir, tmp_path, delay):
    whole = start(data_dir, tmp_path, "whole", "--deterministic")
    assert whole.wait(timeout=300) == 0, whole.stderr.read()

    killed = start(data_dir, tmp_path, "killed", "--deterministic")
    saved_step = kill_after_first_checkpoint(killed, tmp_path / "killed" / "checkpoints", delay)
    assert not (tmp_path / "killed" / "summary.json").exists()
    resumed = start(data_dir, tmp_path, "killed", "--deterministic", "--resume")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert "resumed from" in out

    whole_path, expected = final_weights(tmp_path / "whole")
    resumed_path, got = final_weights(tmp_path / "killed")
    assert whole_path.endswith("-240") and resumed_path.endswith("-240")
    assert 0 < saved_step < 240
    assert expected.keys() == got.keys()
    for name in expected:
        assert np.array_equal(expected[name], got[name]), f"{name} differs after resume from step {saved_step}"
    summary = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert summary["steps"] == 240 and summary["resumed_from"].endswith(f"-{saved_step}")


def test_resume_without_determinism_keeps_step_count_and_data_order(data_dir, tmp_path):
    first = start(data_dir, tmp_path, "r", "--epochs", "2")
    assert first.wait(timeout=300) == 0
    second = start(data_dir, tmp_path, "r", "--epochs", "4", "--resume")
    out, err = second.communicate(timeout=300)
    assert second.returncode == 0, err
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["steps"] == 80 and summary["resumed_from"].endswith("-40")
    assert [h["epoch"] for h in summary["history"]] == [1.0, 2.0, 3.0, 4.0]   # the whole run, across the resume


def test_resume_with_other_flags_is_refused_in_one_line(data_dir, tmp_path):
    assert start(data_dir, tmp_path, "m", "--epochs", "1").wait(timeout=300) == 0
    other_model = subprocess.run([sys.executable, "-m", "fastcore.train", *RUN, "--data-dir", data_dir, "--logdir",
                                  str(tmp_path), "--run-name", "m", "--model-api", "module", "--resume"],
                                 cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert other_model.returncode == 2
    assert len(other_model.stderr.strip().splitlines()) == 1 and "cannot resume" in other_model.stderr


def test_a_resumed_run_keeps_the_precision_it_was_trained_in(data_dir, tmp_path):
    args = [a for a in RUN if a not in ("--precision", "float32")]
    def cli(*extra):
        return subprocess.run([sys.executable, "-m", "fastcore.train", *args, "--data-dir", data_dir, "--logdir",
                               str(tmp_path), "--run-name", "p", "--epochs", "1", *extra],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert cli("--precision", "bfloat16").returncode == 0
    refused = cli("--precision", "float32", "--resume")
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert "trained in bfloat16" in refused.stderr and "--precision bfloat16" in refused.stderr
    adopted = cli("--precision", "auto", "--resume", "--epochs", "2")
    assert adopted.returncode == 0, adopted.stderr
    summary = json.loads((tmp_path / "p" / "summary.json").read_text())
    assert summary["precision"] == "bfloat16" and "checkpoint" in summary["precision_reason"]


def test_a_save_cut_short_leaves_the_previous_checkpoint_in_use(data_dir, tmp_path):
    """What a crash mid-save leaves (a newer checkpoint's data without its index, a temp folder, and no
    `checkpoint` entry) is ignored: the run resumes from the last complete save."""
    assert start(data_dir, tmp_path, "c", "--epochs", "1").wait(timeout=300) == 0
    folder = tmp_path / "c" / "checkpoints"
    (folder / "ckpt-999.data-00000-of-00001").write_bytes(b"\0" * 1000)   # data written, index never was
    (folder / "ckpt-999_temp").mkdir()
    (folder / "ckpt-999_temp" / "part-00000-of-00001.data-00000-of-00001").write_bytes(b"partial")
    resumed = start(data_dir, tmp_path, "c", "--epochs", "2", "--resume")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert "resumed from" in out and out.split("resumed from ")[1].split()[0].endswith("ckpt-20")
