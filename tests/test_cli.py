"""The command line as a user runs it: a separate process, real data, real output."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

HIGGS_SMALL = ["--dataset", "higgs", "--train-split", "train[:2000]", "--eval-split", "train[2000:3000]",
               "--precision", "float32"]   # explicit: auto is decided per machine


def cli(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "fastcore.train", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def test_help_documents_every_flag():
    result = cli("--help")
    assert result.returncode == 0
    for flag in ["--dataset", "--data-dir", "--epochs", "--batch-size", "--learning-rate", "--model-api", "--xla",
                 "--no-xla", "--eager", "--precision", "--steps-per-call", "--verify", "--l2", "--dropout", "--seed",
                 "--logdir", "--run-name", "--train-split", "--eval-split", "FASTCORE_DATA_DIR",
                 "--profile-steps", "--summary-every"]:
        assert flag in result.stdout, flag


def test_a_run_prints_progress_and_writes_its_summary(data_dir, tmp_path):
    result = cli(*HIGGS_SMALL, "--data-dir", data_dir, "--epochs", "2", "--verify", "20", "--logdir", str(tmp_path),
                 "--run-name", "r1")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""   # no TensorFlow start-up noise, no warnings
    assert "verify (float32, 20 steps): PASS" in result.stdout
    epoch_lines = [line for line in result.stdout.splitlines() if line.startswith("Epoch ")]
    assert [line[:11] for line in epoch_lines] == ["Epoch 1/2  ", "Epoch 2/2  "], result.stdout
    assert all("4/4" in line and "eval_binary_accuracy" in line for line in epoch_lines)
    lines = result.stdout.splitlines()
    assert lines[0] == "higgs: starting TensorFlow ..."   # said at once; its time follows when the import ends
    first = next(line for line in lines if " train (" in line)   # compact: files by name (summary.json: paths)
    assert first.startswith("higgs: 2,000 train (train[:2000]), 1,000 eval (train[2000:3000]) from HIGGS") and \
        data_dir not in first, first
    summary = json.loads((tmp_path / "r1" / "summary.json").read_text())
    for key in ["task", "model_api", "precision", "xla", "steps_per_call", "epochs", "steps", "examples_per_sec",
                "compile_seconds", "train_loss", "eval", "verify", "traces"]:
        assert key in summary, key
    assert summary["task"] == "higgs" and summary["xla"] is True and summary["steps"] == 8
    assert summary["traces"] == {"train": 1, "eval": 1}
    assert 0 < summary["eval"]["binary_accuracy"] <= 1 and summary["examples_per_sec"] > 0
    assert not [p for p in (tmp_path / "r1").rglob("*") if p.name.endswith(".tmp")]   # no temp file left
    assert (tmp_path / "r1" / "summary.json").is_file()
    assert all(list((tmp_path / "r1" / run).glob("events.out.tfevents.*")) for run in ("train", "validation"))


@pytest.mark.parametrize("args, message", [
    (["--dataset", "imagenet"], "invalid choice: 'imagenet'"),
    (["--dataset", "higgs", "--epochs", "0"], "--epochs 0 must be positive"),
    (["--dataset", "higgs", "--dropout", "1.5"], "--dropout 1.5 is outside [0, 1)"),
    (["--dataset", "higgs", "--precision", "float8"], "invalid choice: 'float8'"),
    (["--dataset", "higgs", "--xla", "--eager"], "not allowed with argument"),
    (["--dataset", "higgs", "--batch-size", "50000"], "larger than the"),
    (["--dataset", "mnist"], "test[:8000]"),   # the local MNIST folder holds only the test split
    (["--dataset", "higgs", "--train-split", "train[abc]"], "train[abc]"),
])
def test_bad_input_is_one_line_and_exit_code_2(data_dir, tmp_path, args, message):
    result = cli(*args, "--data-dir", data_dir, "--logdir", str(tmp_path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []   # nothing written


def test_missing_data_dir_names_the_fix(tmp_path):
    result = cli("--dataset", "higgs", "--data-dir", str(tmp_path / "nowhere"), "--logdir", str(tmp_path))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "nowhere" in result.stderr


def test_help_and_flag_errors_come_before_tensorflow_is_imported():
    """`--help` and a malformed command line answer at once: the parser needs no TensorFlow."""
    probe = ("import sys; from fastcore import train; code = train.run_cli(sys.argv[1:]); "
             "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'; sys.exit(code)")
    for args, code in ((["--help"], 0), (["--dataset", "nope"], 2)):
        result = subprocess.run([sys.executable, "-c", probe, *args], cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == code, result.stderr
