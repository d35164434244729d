"""The end of a run: its summary (steps, throughput, FLOPs, utilisation, traces) and summary.json.

In the engine, not in fastcore.observe: counting FLOPs builds graphs of the step.
"""
from __future__ import annotations

import os

import tensorflow as tf

from fastcore import atomic
from fastcore.engine import preflight
from fastcore.engine.step import StepContext
from fastcore.observe import flops, phases, tensorboard


def guard(engine, k: int) -> dict:
    """How the finiteness guard checked the run's calls (fastcore.engine.step.Engine.train_many), and how
    many calls it ran again with every step checked."""
    return {"checked": "per call" if k > 1 and engine.calls_checked_once() else "per step",
            "replayed_calls": int(engine.replayed_calls.numpy())}


def fill(summary: dict, loop, engine, feed, k: int, precision: str, mode: str, checkpoints=None, observer=None,
         warm_up_seconds: float | None = None, distributed: bool = False, measure_peak: bool = True) -> None:
    """Fill `summary` from a loop that ran (wholly or until a stop; a stopped run's report uses only a cached
    peak: measuring one takes seconds, and a scheduler's SIGKILL may follow its SIGTERM)."""
    history = (checkpoints.previous_history if checkpoints else []) + loop.history
    final = history[-1] if history else {}
    summary.update({"steps": loop.steps_done, **loop.meter.report(), "train_loss": final.get("train_loss"),
                    "eval": {k_[len("eval_"):]: v for k_, v in final.items() if k_.startswith("eval_")},
                    "skipped_steps": engine.skipped_steps, "traces": engine.ledger.counts(),
                    "guard": guard(engine, k),
                    "input_shapes": engine.ledger.shapes(),
                    "checkpoint": checkpoints.latest if checkpoints else None,
                    "resumed_from": checkpoints.restored_from if checkpoints else None,
                    "resumed_from_step": checkpoints.restored_step if checkpoints else None,
                    "history": history})
    if warm_up_seconds and "step_time_ms" in summary:   # the pre-flight's overlap compiled the step
        call = summary["step_time_ms"] * k / 1000
        summary["compile_seconds"] = max(warm_up_seconds - call, 0.0)
    if distributed:   # measured at the end of every distributed run, not assumed
        summary["replica_spread"] = engine.replica_spread()
    flagged = [f"epoch {h['epoch']:g}: {', '.join(h['non_finite'])}" for h in history if h.get("non_finite")]
    if flagged:   # each also said in a warning line at its epoch's end (fastcore.engine.run.FigureWarnings)
        summary["non_finite_figures"] = flagged
    if checkpoints and checkpoints.failed_saves:
        summary["failed_checkpoint_saves"] = checkpoints.failed_saves
    with phases.phase("report: counting the step's FLOPs" + (", measuring the machine's peak if not cached"
                                                             if measure_peak else "")):
        summary.update(flops_per_example(engine, feed, k))
        if "examples_per_sec" in summary:
            summary.update(tensorboard.utilisation(summary["flops_per_example"], summary["examples_per_sec"],
                                                   precision, matmul_shapes(engine, feed.batch_size), measure_peak))
    if observer:
        summary.update(observer.report(engine.ledger, mode, summary))
    else:
        retraces = engine.ledger.retraces()
        summary.update({"retraced": bool(retraces), "retraces": retraces})


def write(run_dir: str | None, summary: dict, say) -> None:
    """summary.json, atomically; a full or read-only disk costs the file, not the run (said in one line)."""
    if not run_dir:
        return
    path = os.path.join(run_dir, "summary.json")
    try:
        atomic.write_json(path, summary)
    except OSError as e:
        summary["summary_not_written"] = f"{path!r}: {e.strerror or e}"
        say(f"summary.json not written ({path!r}: {e.strerror or e}); the figures below are the run's")


def matmul_shapes(engine, batch_size: int) -> list[tuple[int, int, int]]:
    """(batch, in, out) of every 2-D weight: the step's dense matmuls, for the ceiling's step shape."""
    return [(batch_size, *v.shape.as_list()) for m in engine.models.values()
            for v in m.trainable_variables if v.shape.rank == 2]


def flops_per_example(engine, feed, k: int) -> dict:
    """Training FLOPs per example counted from graphs (see fastcore.observe.flops for the convention)."""
    spec = feed.dataset.element_spec
    if k > 1:
        spec = tf.nest.map_structure(lambda s: tf.TensorSpec(s.shape[1:], s.dtype), spec)
    step_graph = tf.function(lambda b: preflight.outputs(engine, b), autograph=False)
    forward = None
    if engine.eval_fn is not None:
        forward = tf.function(lambda b: engine.eval_fn(b, StepContext(engine, training=False)), autograph=False)
    return flops.per_example(step_graph.get_concrete_function(spec),
                             forward.get_concrete_function(spec) if forward else None, feed.batch_size)
