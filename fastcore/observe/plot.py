"""`python -m fastcore.profile report RUN`: the run's curves in one PNG beside its summary.json.

Three charts against the optimizer step: the losses (each compiled call's, from the TensorBoard events,
and each epoch's train and validation figure, from summary.json's history), the metrics (train and
validation per epoch) and the throughput (examples/s per call, the steady figure, the profiled window
shaded). Drawn with matplotlib, an optional extra (`pip install 'fastcore[plot]'`), without pyplot or a
display.
"""
from __future__ import annotations

import io
import math
import os

from fastcore import atomic
from fastcore.errors import UsageError

FILE = "report.png"
SIZE = (12, 4)   # inches, at DPI
DPI = 100


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def read_summary(run_dir: str) -> dict:
    path = os.path.join(run_dir, "summary.json")
    if not os.path.isfile(path):
        found = "holds no summary.json" if os.path.isdir(run_dir) else "is not a folder"
        raise UsageError(f"{run_dir!r} {found}: pass a run folder (<logdir>/<run-name>, e.g. profiles/<run>) "
                         f"of a run that has ended")
    return atomic.read_json_object(path, "the run's summary", "delete it, or train again")


def call_series(run_dir: str) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} of the run's train/ TensorBoard events, read with TensorBoard's own loader."""
    from tensorboard.backend.event_processing import event_file_loader
    from tensorboard.util import tensor_util
    folder = os.path.join(run_dir, "train")
    series: dict[str, list[tuple[int, float]]] = {}
    if not os.path.isdir(folder):
        return series
    for name in sorted(f for f in os.listdir(folder) if ".tfevents." in f):
        for event in event_file_loader.EventFileLoader(os.path.join(folder, name)).Load():
            for value in event.summary.value:
                number = value.simple_value if value.HasField("simple_value") else \
                    float(tensor_util.make_ndarray(value.tensor))
                series.setdefault(value.tag, []).append((event.step, number))
    return {tag: sorted(points) for tag, points in series.items()}


def _number(value) -> float:
    return float(value) if isinstance(value, (int, float)) else math.nan   # null: non-finite in summary.json


def draw(run_dir: str) -> str:
    """Writes <run_dir>/report.png (atomically) and returns its path; raises UsageError for a bad RUN."""
    from matplotlib.figure import Figure
    summary = read_summary(run_dir)
    history = [h for h in summary.get("history") or [] if isinstance(h, dict)]
    calls = call_series(run_dir)
    steps = [h.get("steps", 0) for h in history]
    names = sorted({k.split("_", 1)[1] for h in history for k in h if k.startswith(("train_", "eval_"))})
    losses = [n for n in names if n.endswith("loss")]
    metrics = [n for n in names if n not in losses]

    figure = Figure(figsize=SIZE, dpi=DPI, layout="constrained")
    loss_ax, metric_ax, rate_ax = figure.subplots(1, 3)
    for i, name in enumerate(losses):
        colour = f"C{i}"
        if f"batch_{name}" in calls:
            x, y = zip(*calls[f"batch_{name}"])
            loss_ax.plot(x, y, color=colour, alpha=0.3, linewidth=1, label=f"{name} (each call)")
        _epochs(loss_ax, steps, history, name, colour)
    _finish(loss_ax, "loss", "no loss in the history")
    for i, name in enumerate(metrics):
        _epochs(metric_ax, steps, history, name, f"C{i}")
    _finish(metric_ax, "metrics", "no metrics (pass metrics= to the Trainer)")
    if "perf/examples_per_sec" in calls:
        x, y = zip(*calls["perf/examples_per_sec"])
        rate_ax.plot(x, y, color="C0", marker="." if len(x) <= 60 else None, linewidth=1, label="each call")
    if summary.get("examples_per_sec"):
        rate_ax.axhline(summary["examples_per_sec"], color="C1", linestyle="--",
                        label=f"steady {summary['examples_per_sec']:,.0f}")
    traced = (summary.get("profile") or {}).get("traced_steps")
    if traced:
        rate_ax.axvspan(min(traced) - 0.5, max(traced) + 0.5, color="grey", alpha=0.2, label="profiled")
    _finish(rate_ax, "examples/s", "no throughput recorded (a run of one compiled call)")
    if rate_ax.lines:
        rate_ax.set_ylim(bottom=0)
    about = [summary.get("task"), summary.get("precision"), summary.get("mode"),
             f"batch {summary['batch_size']}" if "batch_size" in summary else None,
             f"{summary['steps']} steps" if "steps" in summary else None]
    figure.suptitle(f"{os.path.basename(os.path.normpath(run_dir))}: {', '.join(str(a) for a in about if a)}")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    path = os.path.join(run_dir, FILE)
    atomic.write_text(path, buffer.getvalue())
    return path


def _epochs(ax, steps, history, name, colour) -> None:
    for prefix, style, label in (("train_", "o-", "train"), ("eval_", "s--", "validation")):
        if any(f"{prefix}{name}" in h for h in history):
            ax.plot(steps, [_number(h.get(f"{prefix}{name}")) for h in history], style, color=colour,
                    label=f"{label} {name}")


def _finish(ax, title: str, empty: str) -> None:
    ax.set_title(title)
    ax.set_xlabel("optimizer step")
    if ax.lines or ax.patches:
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes, wrap=True)
