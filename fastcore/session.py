"""One CLI run, start to finish: plan, optional verify, train, evaluate, summary.json, exit code."""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import pipelines
import tensorflow as tf

from fastcore import atomic, profiling, quiet, run, verify
from fastcore.checkpoint import CheckpointMismatch, Checkpoints
from fastcore.loop import NonFiniteLoss
from fastcore.progress import Progress


def config_from_args(args: argparse.Namespace) -> run.RunConfig:
    fields = {f.name for f in dataclasses.fields(run.RunConfig)}
    return run.RunConfig(**{k: v for k, v in vars(args).items() if k in fields})


def verify_batches(p: run.Plan, steps: int) -> tuple[list, bool]:
    """The first `steps` training steps' batches (rounded up to whole calls), materialized once."""
    calls = -(-steps // p.steps_per_call)
    stream = pipelines.train_stream(p.train, p.batch_size, p.config.seed, p.steps_per_call)
    return list(stream.take(calls)), p.steps_per_call > 1


def train_and_summarize(p: run.Plan, out=sys.stdout) -> tuple[dict, object]:
    """Verify (when asked) and train the plan; returns the summary and the trained step (None if verify failed)."""
    summary = {"task": p.task.name, "model_api": p.config.model_api, "precision": p.precision.name,
               "precision_reason": p.precision.reason, "mode": p.config.mode, "xla": p.config.mode == "xla",
               "batch_size": p.batch_size, "steps_per_call": p.steps_per_call, "epochs": p.total_steps / p.steps_per_epoch,
               "train_data": p.train.source, "eval_data": p.eval.source}
    if p.config.verify:
        batches, stacked = verify_batches(p, p.config.verify)
        report = verify.verify(lambda prec, mode: run.build_step(p, prec, mode), batches, p.precision,
                               p.config.mode if p.config.mode != "eager" else "xla", stacked)
        print("\n".join(report.lines()), file=out, flush=True)
        summary["verify"] = report.to_json()
        if not report.passed:
            return summary, None
    if p.config.deterministic:
        tf.config.experimental.enable_op_determinism()
    step = run.build_step(p, p.precision, p.config.mode)
    checkpoints = Checkpoints(p.checkpoint_dir, p.config.checkpoint_every or p.steps_per_epoch, p.config.resume,
                              p.precision.name)
    observer = profiling.Observer(p)   # TensorBoard scalars, the --profile-steps trace
    loop = run.make_loop(p, step, [*observer.callbacks, checkpoints, Progress(out=out)])
    try:
        history = loop.run()
    except NonFiniteLoss as e:
        summary["non_finite"] = {"step": e.step, "last_good_checkpoint": checkpoints.latest}
        return summary, step
    final = history[-1]
    summary.update({"steps": loop.steps_done, **loop.meter.report(), "train_loss": final.get("train_loss"),
                    "eval": {k[len("eval_"):]: v for k, v in final.items() if k.startswith("eval_")},
                    "skipped_steps": step.skipped_steps, "traces": step.ledger.counts(),
                    "checkpoint": checkpoints.latest, "resumed_from": checkpoints.restored_from,
                    "history": history})
    summary.update(observer.report(step, loop, summary))
    return summary, step


def main(args: argparse.Namespace) -> int:
    quiet.silence_python_logs()
    config = config_from_args(args)
    try:
        p = run.plan(config)
    except (run.UsageError, pipelines.DataError) as e:
        print(f"fastcore-train: error: {e}", file=sys.stderr)
        return 2
    print(f"{p.task.name}: {len(p.train.x):,} train ({p.train.source}), {len(p.eval.x):,} eval ({p.eval.source}); "
          f"{config.model_api}, {config.mode}, {p.precision.name} ({p.precision.reason}), "
          f"batch {p.batch_size}, {p.steps_per_call} steps/call", flush=True)
    if config.resume and not tf.train.latest_checkpoint(p.checkpoint_dir):
        print(f"--resume: no checkpoint in {p.checkpoint_dir} yet; starting from step 0", flush=True)
    try:
        summary, _ = train_and_summarize(p)
    except CheckpointMismatch as e:
        print(f"fastcore-train: error: {e}", file=sys.stderr)
        return 2
    path = os.path.join(p.run_dir, "summary.json")
    atomic.write_json(path, summary)
    if "verify" in summary and not summary["verify"]["passed"]:
        print(f"verify failed; nothing trained. Details: {path}", file=sys.stderr)
        return 1
    if "non_finite" in summary:
        bad = summary["non_finite"]
        print(f"fastcore-train: stopped: the loss or a gradient was NaN/Inf at step {bad['step']}; no update from it "
              f"was applied; last good checkpoint: {bad['last_good_checkpoint'] or 'none saved yet'}", file=sys.stderr)
        return 3
    if summary["resumed_from"]:
        print(f"resumed from {summary['resumed_from']}", flush=True)
    if summary["skipped_steps"]:
        print(f"{summary['skipped_steps']} steps skipped by the float16 loss scaler (non-finite gradients)", flush=True)
    if "examples_per_sec" in summary:
        print(f"{summary['examples_per_sec']:,.0f} examples/s steady, compile {summary['compile_seconds']:.2f} s, "
              f"input wait {100 * summary['input_wait_share']:.1f}%, {summary['steps']} steps", flush=True)
    elif "first_call_seconds" in summary:
        print(f"{summary['steps']} steps in one compiled call ({summary['first_call_seconds']:.2f} s with compile): "
              f"too short for a steady-state throughput figure", flush=True)
    print("\n".join(profiling.final_lines(summary)), flush=True)
    if profiling.retrace_warning(summary):
        print(profiling.retrace_warning(summary), file=sys.stderr, flush=True)
    print(f"summary: {path}", flush=True)
    return 0
