"""The `fastcore-train` command line: every flag, documented in --help, and one-line usage errors.

Imports no TensorFlow: --help and flag errors are instant.
"""
from __future__ import annotations

import argparse

EPILOG = """\
examples:
  python -m fastcore.train --dataset higgs --data-dir ../shared/data --xla
  python -m fastcore.train --dataset mnist --data-dir ../shared/data --train-split 'test[:8000]' --eval-split 'test[8000:]'
  python -m fastcore.train --dataset higgs --xla          (online: tfds downloads the data)

Local data: --data-dir or $FASTCORE_DATA_DIR names a folder holding mnist/, fashion-mnist/ and
higgs/ (IDX .gz files; a UCI-layout HIGGS.csv.gz), or one such folder itself.
Several devices or machines (tf.distribute; the distributed twin is --verify N):
  python -m fastcore.train --dataset higgs --data-dir ../shared/data --strategy mirrored --devices 2 --verify 20
  python -m fastcore.launch --workers 2 -- --dataset higgs --data-dir ../shared/data --verify 20

Exit codes: 0 done, 1 --verify or the pre-flight check failed, 2 bad input, 3 NaN/Inf stopped the run,
4 a worker was lost mid-run (continue with --resume), 137 (killed) a worker whose peers did not
join within --peer-timeout (TensorFlow waits for them holding the process; a watchdog prints why),
130 / 143 stopped by SIGINT / SIGTERM (in training after saving a checkpoint; continue with --resume),
70 internal error.
"""


class OneLineParser(argparse.ArgumentParser):
    """argparse prints usage plus the error; a user needs the one line that says what is wrong."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def task_table(tasks: dict) -> str:
    """The built-in tasks' defaults, for --help (each can be changed by its flag)."""
    rows = [f"  {'task':<14} {'model (hidden units)':<22} {'batch':>6} {'epochs':>6} {'lr':>7} {'K':>4}  optimizer"]
    for t in tasks.values():
        hidden = "x".join(str(h) for h in t.model.hidden) or "linear"
        rows.append(f"  {t.name:<14} {'MLP ' + hidden:<22} {str(t.batch_size or 'full'):>6} {t.epochs:>6} "
                    f"{t.learning_rate:>7g} {t.steps_per_call:>4}  {t.optimizer}")
    return "task defaults (K: steps per compiled call, rounded to divide an epoch):\n" + "\n".join(rows) + "\n\n"


def _threads(value: str) -> str:
    if value in ("auto", "all") or (value.isdigit() and int(value) > 0):
        return value
    raise argparse.ArgumentTypeError(f"{value!r} is not auto, all or a positive number")


def parser() -> argparse.ArgumentParser:
    from fastcore.engine.precision import CHOICES
    from fastcore.tasks import TASKS
    from fastcore.tasks.specs import MODEL_APIS

    p = OneLineParser(prog="fastcore-train", description="Train a built-in task with XLA-compiled steps "
                                "fed by a streaming tf.data pipeline, checked against the eager twin.",
                                epilog=task_table(TASKS) + EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", "--task", dest="task", required=True, choices=list(TASKS), metavar="NAME",
                   help=f"what to train: {', '.join(TASKS)}")
    p.add_argument("--data-dir", help="folder with local data files (default: $FASTCORE_DATA_DIR, else download with tfds)")
    p.add_argument("--train-split", help="training split in tfds slicing syntax, e.g. train, train[:90%%], test[:8000] "
                   "(default: the task's)")
    p.add_argument("--eval-split", help="evaluation split, same syntax, e.g. test, train[10000:] (default: the task's)")
    p.add_argument("--epochs", type=int, help="passes over the training split (default: the task's)")
    p.add_argument("--batch-size", type=int, help="examples per step (default: the task's; full batch for line and sine)")
    p.add_argument("--learning-rate", type=float, help="optimizer learning rate (default: the task's)")
    p.add_argument("--model-api", choices=MODEL_APIS, default="keras-functional",
                   help="how the model is written: a Keras API or a Keras-free tf.Module (default: %(default)s)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--xla", dest="mode", action="store_const", const="xla",
                      help="compile the step with XLA: tf.function(jit_compile=True) (default)")
    mode.add_argument("--no-xla", dest="mode", action="store_const", const="graph",
                      help="plain tf.function graph, no XLA")
    mode.add_argument("--eager", dest="mode", action="store_const", const="eager",
                      help="run the very same step function eagerly (the reference twin)")
    mode.add_argument("--auto", dest="mode", action="store_const", const="auto",
                      help="time XLA and a plain graph, each with 1 and K steps per call, on the first batches "
                           "(~20 s once, then cached per machine) and keep the fastest (the library's default)")
    p.set_defaults(mode="xla")
    p.add_argument("--precision", choices=CHOICES, default="auto",
                   help="float32; bfloat16 or float16 mixed precision (float16 with dynamic loss scaling); "
                   "auto picks from the hardware and the step's own timing, and says why; under --xla it may run "
                   "bfloat16 as a plain graph when oneDNN's matmuls make that step faster (default: %(default)s)")
    p.add_argument("--steps-per-call", type=int, metavar="K",
                   help="optimizer steps per compiled call, K stacked batches walked inside one graph "
                   "(default: the task's, rounded to divide an epoch)")
    p.add_argument("--verify", type=int, default=0, metavar="N",
                   help="first run N steps compiled and eager from one state and compare them; exit 1 on failure")
    p.add_argument("--no-preflight", dest="preflight", action="store_false",
                   help="skip the pre-flight check (before training, compiled and eager must agree on the first "
                   "batch's losses and gradients; exit 1 if not)")
    p.add_argument("--l2", type=float, default=0.0, help="L2 weight on every kernel (default: 0)")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout rate after each hidden layer (default: 0)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights, shuffling and dropout, 0 to 4294967295 (default: 0)")
    p.add_argument("--logdir", default="profiles", help="parent of run directories (default: %(default)s)")
    p.add_argument("--run-name", help="run directory name: one folder inside --logdir, no path separator or '..' "
                   "(default: built from the flags)")
    p.add_argument("--profile-steps", metavar="A:B",
                   help="profiler trace of steps A to B (from 1, inclusive; whole compiled calls) into "
                   "<logdir>/<run-name>/plugins/profile: view with tensorboard --logdir <logdir>, Profile tab")
    p.add_argument("--summary-every", type=int, metavar="N",
                   help="write TensorBoard scalars every N compiled calls and at the last (default: 1)")
    p.add_argument("--checkpoint-dir", help="where checkpoints go (default: <logdir>/<run-name>/checkpoints)")
    p.add_argument("--checkpoint-every", type=int, metavar="N",
                   help="save a checkpoint every N steps, at the next call end (default: every epoch); "
                   "one is always saved at the end; the last 3 are kept")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest intact checkpoint in the checkpoint dir: the same run only (another data "
                   "file, split, batch size, seed, model or optimizer is refused); only --epochs may grow")
    p.add_argument("--deterministic", action="store_true",
                   help="turn on TensorFlow op determinism: a resumed run then ends bit-identical to an "
                   "uninterrupted one")
    p.add_argument("--threads", default="auto", type=_threads, metavar="auto|all|N",
                   help="intra-op threads: auto times the run's own step on one thread and on all (in two child "
                   "processes: measured 26 s on a machine's first run, 10-20 s for a new configuration, 0 once "
                   "cached per machine and configuration) and keeps the faster; small steps such as MNIST at batch "
                   "32 run faster on one (default: %(default)s)")
    p.add_argument("--strategy", choices=("none", "mirrored", "multi-worker"), default="none",
                   help="tf.distribute strategy: none (one device), mirrored (the devices of this machine: its "
                   "GPUs, or --devices N logical CPU devices), multi-worker (the workers of $TF_CONFIG; "
                   "python -m fastcore.launch starts them locally) (default: %(default)s)")
    p.add_argument("--devices", type=int, metavar="N",
                   help="devices per worker for --strategy mirrored / multi-worker: the first N GPUs, or the CPU "
                   "split into N logical devices where there is no GPU (for testing: they share the cores)")
    p.add_argument("--peer-timeout", type=float, default=120.0, metavar="S",
                   help="multi-worker: seconds to wait for every worker to join (then one line, and the "
                   "process is killed: exit 137) and for a worker that stops answering mid-run (then exit 4) "
                   "(default: %(default)s)")
    return p
