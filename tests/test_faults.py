"""Never lose a run: each fault a careful user can cause gives its exit code and one line, no traceback,
nothing half-written, and a resume that continues correctly. Real files, real signals, a real full disk
(a tiny tmpfs) where the machine lets the tests mount one."""
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

import helpers
from conftest import ROOT
from helpers import one_line
from fastcore.train import run_cli

SMALL = ["--dataset", "higgs", "--train-split", "train[:2000]", "--eval-split", "train[2000:2500]",
         "--precision", "float32", "--steps-per-call", "2", "--checkpoint-every", "4"]


def cli(data_dir, logdir, *extra):
    """(exit code, stdout, stderr lines) of an in-process CLI run of the small task."""
    return helpers.cli(*SMALL, "--data-dir", data_dir, "--logdir", str(logdir), *extra)


def checkpoints(run_dir):
    folder = os.path.join(run_dir, "checkpoints")
    return sorted(int(f.split("-")[1].split(".")[0]) for f in os.listdir(folder) if f.endswith(".index"))


def final_weights(prefix):
    reader = tf.train.load_checkpoint(prefix)
    return {n: reader.get_tensor(n) for n, _ in tf.train.list_variables(prefix) if n.startswith("models/")}


@pytest.mark.parametrize("change, field", [
    (["--train-split", "train[:1800]"], "train_data"),
    (["--batch-size", "250"], "batch_size"),
    (["--seed", "3"], "seed"),
    (["--steps-per-call", "4"], "steps_per_call"),
    (["--l2", "0.01"], "l2"),
])
def test_resume_with_another_run_identity_is_refused_naming_the_field(data_dir, tmp_path, change, field):
    assert cli(data_dir, tmp_path, "--epochs", "2", "--run-name", "r")[0] == 0
    flags = [*SMALL[:], "--epochs", "3", "--run-name", "r", "--resume", *change]
    code, _, err = cli(data_dir, tmp_path, *flags[len(SMALL):])
    assert code == 2
    line = one_line(err, "not the same run", field, "->")
    assert "only the length" in line
    assert checkpoints(tmp_path / "r") == [4, 8]   # nothing written


def test_a_replaced_data_file_is_a_different_run(data_dir, tmp_path):
    data = tmp_path / "data" / "higgs"
    data.mkdir(parents=True)
    original = os.path.join(data_dir, "higgs", "HIGGS-sample.csv.gz")
    shutil.copy(original, data / "HIGGS.csv.gz")
    run = ["--dataset", "higgs", "--train-split", "train[:2000]", "--eval-split", "train[2000:2500]", "--precision",
           "float32", "--steps-per-call", "2", "--data-dir", str(tmp_path / "data"), "--logdir", str(tmp_path / "runs"),
           "--run-name", "r"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert run_cli([*run, "--epochs", "1"]) == 0
    import gzip
    lines = gzip.open(original, "rt").read().splitlines()
    with gzip.open(data / "HIGGS.csv.gz", "wt") as f:   # other rows in the same layout
        f.write("\n".join(lines[3000:] + lines[:3000]) + "\n")
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        assert run_cli([*run, "--epochs", "2", "--resume"]) == 2
    one_line(err.getvalue().splitlines(), "not the same run", "data")


def test_resume_of_a_finished_run_changes_nothing(data_dir, tmp_path):
    assert cli(data_dir, tmp_path, "--epochs", "2", "--run-name", "r")[0] == 0
    summary = (tmp_path / "r" / "summary.json").read_text()
    code, out, err = cli(data_dir, tmp_path, "--epochs", "2", "--run-name", "r", "--resume")
    assert code == 0 and not err
    assert "the run is complete" in out and "nothing changed" in out
    assert (tmp_path / "r" / "summary.json").read_text() == summary
    assert checkpoints(tmp_path / "r") == [4, 8]


def test_history_and_summary_cover_the_whole_run_across_resumes(data_dir, tmp_path):
    assert cli(data_dir, tmp_path, "--epochs", "2", "--run-name", "r")[0] == 0
    assert cli(data_dir, tmp_path, "--epochs", "4", "--run-name", "r", "--resume")[0] == 0
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert [h["steps"] for h in summary["history"]] == [4, 8, 12, 16]
    assert summary["steps"] == 16 and summary["resumed_from"].endswith("ckpt-8")


def test_a_second_run_on_a_run_directory_is_refused(data_dir, tmp_path):
    assert cli(data_dir, tmp_path, "--epochs", "1", "--run-name", "r")[0] == 0
    code, _, err = cli(data_dir, tmp_path, "--epochs", "1", "--run-name", "r")
    assert code == 2
    one_line(err, "already holds checkpoints", "--resume")


def start(data_dir, logdir, name, *extra):
    return subprocess.Popen([sys.executable, "-m", "fastcore.train", *SMALL, "--data-dir", data_dir, "--logdir",
                             str(logdir), "--run-name", name, *extra], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_step(run_dir, step, proc, timeout=120):
    """Block until a checkpoint at or past `step` exists (the run is mid-training then)."""
    deadline = time.time() + timeout
    while not (os.path.isdir(os.path.join(run_dir, "checkpoints")) and checkpoints(run_dir)
               and max(checkpoints(run_dir)) >= step):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.02)


def test_two_runs_at_once_on_one_run_directory(data_dir, tmp_path):
    first = start(data_dir, tmp_path, "r", "--epochs", "200")
    wait_for_step(str(tmp_path / "r"), 4, first)
    second = start(data_dir, tmp_path, "r", "--epochs", "200", "--resume")
    _, err = second.communicate(timeout=120)
    assert second.returncode == 2
    one_line(err.strip().splitlines(), "is in use by another run", "pid")
    first.send_signal(signal.SIGKILL)
    first.wait()
    third = start(data_dir, tmp_path, "r", "--epochs", "1", "--resume")   # a killed run leaves no stuck lock
    third.communicate(timeout=120)
    assert third.returncode == 0


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_after_the_call_in_flight_with_a_checkpoint(data_dir, tmp_path, sig, code):
    run_dir = tmp_path / "r"
    proc = start(data_dir, tmp_path, "r", "--epochs", "400")
    wait_for_step(str(run_dir), 8, proc)
    sent = time.time()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    stopped_within = time.time() - sent
    assert proc.returncode == code
    line = one_line(err.strip().splitlines(), f"stopped by {signal.Signals(sig).name} at step", "continue with --resume")
    step = int(line.split("at step ")[1].split(";")[0])
    assert max(checkpoints(run_dir)) == step   # nothing lost but the call in flight
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["interrupted"]["step"] == step and summary["interrupted"]["signal"] == signal.Signals(sig).name
    assert stopped_within < 30, f"took {stopped_within:.1f} s to stop"
    resumed = start(data_dir, tmp_path, "r", "--epochs", str(step // 4 + 2), "--resume")
    out, _ = resumed.communicate(timeout=120)
    assert resumed.returncode == 0 and out.split("resumed from ")[1].split()[0].endswith(f"ckpt-{step}")


def test_a_sigterm_then_resume_ends_bit_identical_under_deterministic(data_dir, tmp_path):
    flags = ("--epochs", "60", "--deterministic", "--dropout", "0.2")
    whole = start(data_dir, tmp_path, "whole", *flags)
    whole.communicate(timeout=300)
    assert whole.returncode == 0
    cut = start(data_dir, tmp_path, "cut", *flags)
    wait_for_step(str(tmp_path / "cut"), 8, cut)
    cut.send_signal(signal.SIGTERM)
    cut.communicate(timeout=60)
    assert cut.returncode == 143
    resumed = start(data_dir, tmp_path, "cut", *flags, "--resume")
    resumed.communicate(timeout=300)
    assert resumed.returncode == 0
    a = final_weights(tf.train.latest_checkpoint(str(tmp_path / "whole" / "checkpoints")))
    b = final_weights(tf.train.latest_checkpoint(str(tmp_path / "cut" / "checkpoints")))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def damage_truncate(prefix):
    with open(prefix + ".data-00000-of-00001", "r+b") as f:
        f.truncate(64)


def damage_flip(prefix):
    path = prefix + ".data-00000-of-00001"
    data = bytearray(open(path, "rb").read())
    for i in range(0, len(data), 97):
        data[i] ^= 0xFF
    open(path, "wb").write(bytes(data))


def damage_index_deleted(prefix):
    os.remove(prefix + ".index")


def damage_index_garbage(prefix):
    open(prefix + ".index", "wb").write(b"not a checkpoint index")


@pytest.mark.parametrize("damage", [damage_truncate, damage_flip, damage_index_deleted, damage_index_garbage])
def test_a_damaged_newest_checkpoint_is_named_and_the_newest_intact_one_used(data_dir, tmp_path, damage):
    assert cli(data_dir, tmp_path, "--epochs", "3", "--run-name", "r")[0] == 0   # ckpt-4, 8, 12
    damage(str(tmp_path / "r" / "checkpoints" / "ckpt-12"))
    code, out, err = cli(data_dir, tmp_path, "--epochs", "4", "--run-name", "r", "--resume")
    assert code == 0 and not err
    assert "resumed from" in out and "ckpt-8" in out.split("resumed from")[1].splitlines()[0]
    if damage is not damage_index_deleted:
        assert "damaged checkpoint(s) skipped: ckpt-12" in out
    assert 4 in checkpoints(tmp_path / "r") or 8 in checkpoints(tmp_path / "r")


@pytest.mark.parametrize("state", [b"garbage\x00\xff", b""])
def test_a_garbage_or_empty_index_file_is_rebuilt_and_no_intact_checkpoint_is_deleted(data_dir, tmp_path, state):
    assert cli(data_dir, tmp_path, "--epochs", "3", "--run-name", "r")[0] == 0
    (tmp_path / "r" / "checkpoints" / "checkpoint").write_bytes(state)
    code, out, err = cli(data_dir, tmp_path, "--epochs", "4", "--run-name", "r", "--resume")
    assert code == 0 and not err
    assert "rebuilt it from 3 checkpoint files" in out and "ckpt-12" in out.split("resumed from")[1]
    assert checkpoints(tmp_path / "r")[-1] == 16


def test_an_overflowing_update_never_reaches_a_checkpoint(data_dir, tmp_path):
    code, _, err = cli(data_dir, tmp_path, "--epochs", "2", "--run-name", "r", "--learning-rate", "1e39",
                       "--steps-per-call", "1", "--checkpoint-every", "1")
    assert code == 3
    one_line(err, "NaN/Inf at step", "last good checkpoint")
    folder = tmp_path / "r" / "checkpoints"
    for prefix in ([str(folder / f"ckpt-{s}") for s in checkpoints(tmp_path / "r")] if folder.exists() else []):
        assert all(np.isfinite(v).all() for v in final_weights(prefix).values())


@pytest.mark.parametrize("flag, value", [("--learning-rate", "nan"), ("--learning-rate", "inf"),
                                         ("--l2", "nan"), ("--dropout", "nan")])
def test_non_finite_numbers_are_bad_input(data_dir, tmp_path, flag, value):
    code, _, err = cli(data_dir, tmp_path, "--epochs", "1", flag, value)
    assert code == 2
    one_line(err, flag)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("flag", ["--logdir", "--run-name", "--data-dir"])
def test_undecodable_paths_are_bad_input(data_dir, tmp_path, flag):
    weird = os.fsdecode(str(tmp_path).encode() + b"/bad\xff")
    args = {"--logdir": ["--logdir", weird], "--run-name": ["--run-name", "bad\udcff"], "--data-dir": ["--data-dir", weird]}
    out, err = io.StringIO(), io.StringIO()
    base = [a for a in SMALL] + ["--epochs", "1"]
    if flag != "--logdir":
        base += ["--logdir", str(tmp_path)]
    if flag != "--data-dir":
        base += ["--data-dir", data_dir]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run_cli(base + args[flag])
    assert code == 2
    one_line(err.getvalue().splitlines(), flag, "not UTF-8")


def test_a_cache_dir_that_is_a_file_is_one_line(data_dir, tmp_path, monkeypatch):
    blocker = tmp_path / "cachefile"
    blocker.write_text("x")
    monkeypatch.setenv("FASTCORE_CACHE_DIR", str(blocker / "sub"))
    code, _, err = cli(data_dir, tmp_path / "runs", "--epochs", "1")
    assert code == 2
    one_line(err, "cache")


def test_an_unexpected_error_is_exit_70_with_a_saved_traceback(data_dir, tmp_path, monkeypatch):
    from fastcore.cli import plan
    monkeypatch.setattr(plan, "plan", lambda config, strategy=None, data=None: (_ for _ in ()).throw(RuntimeError("boom")))
    code, _, err = cli(data_dir, tmp_path, "--epochs", "1")
    assert code == 70
    line = one_line(err, "internal error: RuntimeError: boom", "traceback saved to")
    path = line.split("traceback saved to ")[1].split(";")[0].strip("'")
    assert "Traceback" in open(path).read()
    os.remove(path)


def tmpfs(folder, options: str):
    """A real tmpfs mounted at `folder` (created) for the test's duration; unmounted after."""
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root (CI and the development machines run as root)")
    yield folder
    subprocess.run(["umount", str(folder)], capture_output=True)


@pytest.fixture
def small_disk(tmp_path):
    """A 26 MB tmpfs: room for two HIGGS checkpoints (about 10 MB each with Adam's slots), not three."""
    yield from tmpfs(tmp_path / "disk", "size=26m")


def test_a_full_disk_during_checkpoints_costs_the_checkpoint_not_the_run(data_dir, small_disk):
    code, out, err = cli(data_dir, small_disk, "--epochs", "12", "--run-name", "r", "--checkpoint-every", "2")
    assert code == 0, err
    assert "not written" in out and "stays the latest" in out
    folder = small_disk / "r" / "checkpoints"
    assert not [f for f in os.listdir(folder) if "_temp" in f], "a temp folder was left behind"
    latest = tf.train.latest_checkpoint(str(folder))
    assert latest and all(np.isfinite(v).all() for v in final_weights(latest).values())   # readable, intact
    assert "examples/s steady" in out   # the final figures are still printed


@pytest.fixture
def read_only_folder(tmp_path):
    """A read-only tmpfs: unwritable even for root, as a read-only disk or share is."""
    yield from tmpfs(tmp_path / "ro", "ro,size=1m")


def test_a_read_only_run_folder_is_refused_before_training(data_dir, read_only_folder):
    code, out, err = cli(data_dir, read_only_folder, "--epochs", "1")
    assert code == 2
    one_line(err, "--logdir", "not writable")
    assert "epoch" not in out


def test_a_read_only_cache_folder_costs_the_cache_not_the_run(data_dir, tmp_path, read_only_folder, monkeypatch):
    monkeypatch.setenv("FASTCORE_CACHE_DIR", str(read_only_folder))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run_cli(["--dataset", "mnist", "--data-dir", data_dir, "--train-split", "test[:640]", "--eval-split",
                        "test[640:700]", "--precision", "auto", "--epochs", "1", "--logdir", str(tmp_path)])
    assert code == 0, err.getvalue()   # calibration and auto's timing are measured, just not cached
    assert "Traceback" not in err.getvalue()
    code, _, err_lines = cli(data_dir, tmp_path / "higgs", "--epochs", "1")   # HIGGS needs its row cache
    assert code == 2
    one_line(err_lines, "cache")


def test_a_summary_that_cannot_be_written_is_said_and_the_figures_still_printed(data_dir, tmp_path, monkeypatch):
    from fastcore import atomic

    def disk_full(path, data):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(atomic, "write_json", disk_full)
    code, out, err = cli(data_dir, tmp_path, "--epochs", "2", "--run-name", "r")
    assert code == 0 and not err
    assert "summary.json not written" in out and "No space left on device" in out
    assert "examples/s steady" in out and not (tmp_path / "r" / "summary.json").exists()


@pytest.mark.parametrize("garbage", ["rows", "nan"])
def test_a_damaged_row_cache_is_rebuilt_with_one_line_and_trains_as_before(data_dir, tmp_path, monkeypatch, garbage):
    cache_dir = tmp_path / "cache"
    monkeypatch.setenv("FASTCORE_CACHE_DIR", str(cache_dir))
    code, out, _ = cli(data_dir, tmp_path, "--epochs", "1", "--run-name", "a")
    assert code == 0
    [cache] = [p for p in cache_dir.iterdir() if p.suffix == ".rows"]
    with open(cache, "r+b") as f:   # same size: 500 rows of garbage, or NaNs, in the middle of the payload
        f.seek(64 + 1000 * 29 * 4)
        f.write((np.full(500 * 29, np.nan, np.float32) if garbage == "nan"
                 else np.random.default_rng(0).normal(0, 1e6, 500 * 29).astype(np.float32)).tobytes())
    code, again, err = cli(data_dir, tmp_path, "--epochs", "1", "--run-name", "b")
    assert code == 0
    one_line(err, "failed its checksum; rebuilding it from")
    loss = lambda text: [l[l.index("train_loss"):] for l in text.splitlines() if l.startswith("Epoch 1/")][0]
    assert loss(again) == loss(out)   # the same data as before the damage, not garbage
