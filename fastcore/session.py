"""One CLI run, start to finish: plan, optional verify, train, evaluate, summary.json, exit code."""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import pipelines
from fastcore import atomic, run, verify
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
    step = run.build_step(p, p.precision, p.config.mode)
    loop = run.make_loop(p, step, [Progress(out=out)])
    history = loop.run()
    final = history[-1]
    summary.update({"steps": loop.steps_done, **loop.meter.report(), "train_loss": final["train_loss"],
                    "eval": {k[len("eval_"):]: v for k, v in final.items() if k.startswith("eval_")},
                    "traces": step.ledger.counts(), "history": history})
    return summary, step


def main(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    try:
        p = run.plan(config)
    except (run.UsageError, pipelines.DataError) as e:
        print(f"fastcore-train: error: {e}", file=sys.stderr)
        return 2
    print(f"{p.task.name}: {len(p.train.x):,} train ({p.train.source}), {len(p.eval.x):,} eval ({p.eval.source}); "
          f"{config.model_api}, {config.mode}, {p.precision.name} ({p.precision.reason}), "
          f"batch {p.batch_size}, {p.steps_per_call} steps/call", flush=True)
    summary, _ = train_and_summarize(p)
    path = os.path.join(p.run_dir, "summary.json")
    atomic.write_json(path, summary)
    if "verify" in summary and not summary["verify"]["passed"]:
        print(f"verify failed; nothing trained. Details: {path}", file=sys.stderr)
        return 1
    print(f"{summary['examples_per_sec']:,.0f} examples/s steady, compile {summary['compile_seconds']:.2f} s, "
          f"input wait {100 * summary['input_wait_share']:.1f}%, {summary['steps']} steps", flush=True)
    print(f"summary: {path}", flush=True)
    return 0
