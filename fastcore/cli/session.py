"""One CLI run, start to finish: plan, optional verify, Trainer.fit, summary.json, exit code.

Exit codes, one meaning each: 0 done, 1 verify or pre-flight disagreement, 2 bad input, 3 non-finite,
4 a multi-worker peer was lost or did not join (fastcore.distribute), 130 / 143 stopped by SIGINT / SIGTERM
(in training: after a checkpoint; anywhere else: one line saying which checkpoint is on disk), 70 an
internal error (one line on stderr naming the file that holds the traceback).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import traceback

import pipelines

from fastcore import atomic
from fastcore.cli import plan as planning, quiet, threads
from fastcore import distribute
from fastcore.engine.runguard import Signalled
from fastcore.options import FitOptions, identity_fields
from fastcore.errors import CheckpointMismatch, Interrupted, NonFiniteError, PeerLost, PreflightError, UsageError
from fastcore.observe import phases, tensorboard, timing

EXIT_INTERNAL = 70   # EX_SOFTWARE


def config_from_args(args: argparse.Namespace) -> planning.RunConfig:
    fields = {f.name for f in dataclasses.fields(planning.RunConfig)}
    return planning.RunConfig(**{k: v for k, v in vars(args).items() if k in fields})


def summary_fields(p: planning.Plan) -> dict:
    """What the run is, at the head of summary.json."""
    from fastcore.observe import calibrate
    return {"task": p.task.name, "model_api": p.config.model_api, "intra_op_threads": calibrate.threads()}


def identity(p: planning.Plan) -> dict:
    """The CLI's part of the run's identity (a resume with any of it changed is refused): RunConfig's IDENTITY
    fields, and the data and learning rate in use."""
    return identity_fields(p.config, train_data=p.train.source, eval_data=p.eval.source, learning_rate=p.learning_rate)


def train_and_summarize(p: planning.Plan, out=None) -> tuple[dict, object]:
    """Verify (when asked) and train the plan; returns the summary and the trainer's engine (None if
    verify failed). Raises NonFiniteError (its .summary holds the summary), PreflightError, CheckpointMismatch."""
    trainer, c, out = p.trainer, p.config, out or sys.stdout
    head = {**summary_fields(p), "precision": p.precision.name, "precision_reason": p.precision.reason,
            "mode": trainer.run_mode, "xla": trainer.run_mode == "xla", "batch_size": p.batch_size, "steps_per_call": p.steps_per_call,
            "epochs": p.total_steps / p.steps_per_epoch, "train_data": p.train.source, "eval_data": p.eval.source}
    if c.verify:
        with phases.phase(f"verify: {c.verify} steps compiled and eager from one state"):
            report = trainer.verify(p.feed, steps=c.verify)
        lines = report.lines()
        if report.steps != c.verify:   # whole compiled calls: say why the count differs from the flag's
            lines[0] += f" ({report.steps // p.steps_per_call} whole calls of {p.steps_per_call} steps for --verify {c.verify})"
        # The per-variable table when it matters (a failure, on the chief); summary.json always holds it.
        short = report.passed or not distribute.is_chief(trainer.strategy)
        print("\n".join(lines[:1] + lines[-1:] if short else lines), file=out, flush=True)
        head["verify"] = report.to_json()
        if not report.passed:
            return head, None
    options = FitOptions(steps=p.total_steps, validation_batch_size=planning.eval_batch_size(p), run_dir=p.run_dir,
                         checkpoint_dir=p.checkpoint_dir, checkpoint_every=c.checkpoint_every, resume=c.resume,
                         profile_steps=c.profile_steps, summary_every=c.summary_every,
                         deterministic=c.deterministic, out=out, summary_head=head, identity=identity(p))
    result = trainer.run(p.feed, options=options, validation_data=p.eval)
    return result.summary, trainer.engine


def main(args: argparse.Namespace) -> int:
    """Run, and turn every outcome into its exit code; an unexpected error is one line plus a traceback file."""
    where = {"phase": "while preparing the run", "checkpoint_dir": None}   # what a signal interrupted
    try:
        return _main(args, where)
    except Signalled as e:   # outside the training loop (the loop stops at a call end: Interrupted)
        folder = where["checkpoint_dir"]
        newest = _newest_checkpoint(folder) if folder else None
        kept = f"the newest checkpoint is {newest!r}; continue with --resume" if newest else "no checkpoint was written"
        if e.after_last_step:   # during the report: Run.fit wrote summary.json before delivering it
            kept = f"training is complete: the newest checkpoint is {newest!r} and summary.json is written"
        phase = "after the last step" if e.after_last_step else where["phase"]
        if phases.stopped_in() and not e.after_last_step:   # the announced phase it stopped, e.g. threads timing
            phase += f" ({phases.stopped_in()})"
        print(f"fastcore-train: stopped by {e.name} {phase}; {kept}", file=sys.stderr)
        return e.exit_code
    except Exception as e:   # noqa: BLE001 (the last resort: one line, never a traceback on the terminal)
        fd, path = tempfile.mkstemp(prefix="fastcore-error-", suffix=".txt")
        with os.fdopen(fd, "w") as f:
            traceback.print_exc(file=f)
        print(f"fastcore-train: internal error: {type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''} "
              f"(traceback saved to {path!r}; please report it)", file=sys.stderr)
        return EXIT_INTERNAL


def _main(args: argparse.Namespace, where: dict) -> int:
    quiet.silence_python_logs()
    config = config_from_args(args)
    try:
        # Threads and the strategy first: both must be set before TensorFlow runs any op.
        planning.check(config)   # bad flags are said before any timing
        # Local data first, in this process: its progress reaches the user and the timing children read the
        # row cache. tfds starts TensorFlow (fixing the thread count), so it loads after the threads are set.
        data = None if planning.data_needs_tensorflow(config) else planning.load_data(config)
        count, threads_why = threads.decide(config.threads, config)
        threads.use(count)
        strategy = distribute.strategy(config.strategy, config.devices, config.peer_timeout)
        p = planning.plan(config, strategy, data)
    except (UsageError, pipelines.DataError) as e:
        print(f"fastcore-train: error: {e}", file=sys.stderr)
        return 2
    chief = distribute.is_chief(strategy)
    print(f"{p.task.name}: {data_line(p.train, p.eval)}; "
          f"{config.model_api}, {p.trainer.run_mode}, {p.precision.name}, batch {p.batch_size}, "
          f"{p.steps_per_call} steps/call", flush=True)
    print(f"precision: {p.precision.name} ({p.precision.reason})", flush=True)   # why, on a line of its own
    print(f"threads: {count or 'all'} intra-op ({threads_why})", flush=True)
    if strategy is not None:
        print(f"distributed: {p.trainer.engine.placement}", flush=True)
    path = os.path.join(p.run_dir, "summary.json")
    if config.resume and not _newest_checkpoint(p.checkpoint_dir):
        print(f"--resume: no checkpoint in {p.checkpoint_dir!r} yet; starting from step 0", flush=True)
    where.update(phase="during the run", checkpoint_dir=p.checkpoint_dir)
    try:
        summary, _ = train_and_summarize(p)
    except (CheckpointMismatch, UsageError, pipelines.DataError) as e:
        print(f"fastcore-train: error: {e}", file=sys.stderr)
        return 2
    except PreflightError as e:
        print(f"fastcore-train: {e}", file=sys.stderr)
        return 1
    except NonFiniteError as e:
        print(f"fastcore-train: stopped: {e}", file=sys.stderr)
        return 3
    except Interrupted as e:
        print(f"fastcore-train: {e}", file=sys.stderr)
        return e.exit_code
    except PeerLost as e:
        print(f"fastcore-train: stopped: {e}", file=sys.stderr)
        return distribute.EXIT_PEER_LOST
    except distribute.PEER_FAULTS as e:   # outside training (verify, evaluation): no step to name
        print(f"fastcore-train: stopped: a worker was lost ({distribute.first_line(e)})", file=sys.stderr)
        return distribute.EXIT_PEER_LOST
    where["phase"] = "after the run"
    if "verify" in summary and not summary["verify"]["passed"]:
        if chief:
            atomic.write_json(path, summary)
        print(f"verify failed; nothing trained. Details: {path}", file=sys.stderr)
        return 1
    if not chief:   # the chief reports the run; a worker says it finished
        print(f"worker done: {summary.get('steps')} steps, train_loss {summary.get('train_loss')}", flush=True)
        return 0
    if summary.get("resumed_from"):
        print(f"resumed from {summary['resumed_from']}", flush=True)
    if summary.get("skipped_steps"):
        print(f"{summary['skipped_steps']} steps skipped by the float16 loss scaler (non-finite gradients)", flush=True)
    if "examples_per_sec" in summary:
        print(f"{summary['examples_per_sec']:,.0f} examples/s steady, compile {summary['compile_seconds']:.2f} s, "
              f"input wait {100 * summary['input_wait_share']:.1f}%, {summary['steps']} steps", flush=True)
    elif summary.get("compiled_calls") == 1:
        print(f"{summary['steps']} steps in one compiled call ({summary['first_call_seconds']:.2f} s with compile): "
              f"too short for a steady-state throughput figure", flush=True)
    elif "first_call_seconds" in summary:   # every call after the first was profiled
        prof = summary.get("profile") or {}
        traced = (f"; under the profiler {prof['examples_per_sec']:,.0f} examples/s, {prof['step_time_ms']:.3f} ms/step"
                  if prof.get("calls") else "")
        print(f"{summary['steps']} steps in {summary['compiled_calls']} compiled calls: the first is never counted as "
              f"steady and the others were profiled, so no steady-state throughput figure{traced}", flush=True)
    print("\n".join(tensorboard.final_lines(summary)), flush=True)
    if "utilisation_left_out" in summary:
        print(f"utilisation: left out ({summary['utilisation_left_out']})", flush=True)
    if tensorboard.retrace_warning(summary):
        print(tensorboard.retrace_warning(summary), file=sys.stderr, flush=True)
    if threads_why.startswith("auto") and summary.get("examples_per_sec"):
        stale = threads.recheck(config, count, timing.run_rate(summary))
        if stale:
            print(stale, flush=True)
    print(f"summary: {path}", flush=True)
    return 0


def data_line(train, evaluation) -> str:
    """`2,000 train (train[:2000]), 1,000 eval (train[2000:3000]) from HIGGS.csv.gz`: files by name, one
    shared file said once (summary.json keeps the full paths)."""
    def split(source: str) -> tuple[str, str]:
        where, _, spec = source.rpartition(" ")
        return (os.path.basename(where) if os.path.isabs(where) else where), spec
    (train_from, train_spec), (eval_from, eval_spec) = split(train.source), split(evaluation.source)
    if train_from == eval_from:
        return f"{len(train.x):,} train ({train_spec}), {len(evaluation.x):,} eval ({eval_spec}) from {train_from}"
    return f"{len(train.x):,} train ({train_from} {train_spec}), {len(evaluation.x):,} eval ({eval_from} {eval_spec})"


def _newest_checkpoint(folder: str) -> str | None:
    from fastcore.engine import checkpoint
    return (checkpoint.on_disk(folder) or [None])[0]
