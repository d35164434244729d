"""Assemble one CLI run from a RunConfig: check the flags, load the data, make the task's Trainer.

The CLI is a client of the library: the task's model, optimizer and loss go into a `fastcore.Trainer`
(fastcore.tasks.trainer_for), and the run is `Trainer.fit`. Tests and benchmarks call these functions.
"""
from __future__ import annotations

import dataclasses
import math
import os

import pipelines
from fastcore import atomic, tasks
from fastcore.engine.precision import Precision
from fastcore.errors import UsageError
from fastcore.options import IDENTITY
from fastcore.observe import phases, tensorboard
from fastcore.tasks.specs import MODEL_APIS, Regularization
from fastcore.engine.feeding import largest_divisor_at_most
from fastcore.trainer import Trainer


# Marks on RunConfig's fields: STEP_COST fields change what a step costs (the --threads auto cache key);
# IDENTITY fields make a run this run (a resume with any of them changed is refused).
STEP_COST = {"step_cost": True}
MAX_SEED = 2**32 - 1


@dataclasses.dataclass
class RunConfig:
    task: str = dataclasses.field(metadata={**STEP_COST, **IDENTITY})
    data_dir: str | None = dataclasses.field(default=None, metadata=STEP_COST)
    epochs: int | None = None
    batch_size: int | None = dataclasses.field(default=None, metadata=STEP_COST)
    learning_rate: float | None = None
    model_api: str = dataclasses.field(default="keras-functional", metadata={**STEP_COST, **IDENTITY})
    mode: str = dataclasses.field(default="xla", metadata=STEP_COST)                 # xla | graph | eager
    precision: str = dataclasses.field(default="auto", metadata=STEP_COST)
    steps_per_call: int | None = dataclasses.field(default=None, metadata=STEP_COST)
    verify: int = 0
    l2: float = dataclasses.field(default=0.0, metadata={**STEP_COST, **IDENTITY})
    dropout: float = dataclasses.field(default=0.0, metadata={**STEP_COST, **IDENTITY})
    seed: int = 0
    logdir: str = "profiles"
    run_name: str | None = None
    train_split: str | None = dataclasses.field(default=None, metadata=STEP_COST)
    eval_split: str | None = None
    checkpoint_dir: str | None = None   # default: <run_dir>/checkpoints
    checkpoint_every: int | None = None  # steps; default: one epoch
    resume: bool = False
    deterministic: bool = False
    profile_steps: str | None = None    # "A:B": profiler trace of steps A..B (from 1), see fastcore.profiling
    summary_every: int | None = None    # compiled calls between TensorBoard scalar writes (default 1)
    preflight: bool = True              # compare compiled and eager on the first batch before training
    threads: str = "auto"               # auto | all | N intra-op threads (fastcore.cli.threads)
    strategy: str = "none"              # none | mirrored | multi-worker (fastcore.distribute)
    devices: int | None = None          # devices per worker (logical CPU devices where there is no GPU)
    peer_timeout: float = 120.0         # multi-worker: seconds to wait for a peer


@dataclasses.dataclass
class Plan:
    """Everything decided before the first step: task, data, the Trainer and its feed, step counts."""
    config: RunConfig
    task: tasks.Task
    train: pipelines.Arrays
    eval: pipelines.Arrays
    batch_size: int
    learning_rate: float
    steps_per_epoch: int
    steps_per_call: int
    total_steps: int
    trainer: Trainer
    feed: object   # fastcore.engine.feeding.Feed

    @property
    def precision(self) -> Precision:
        return self.trainer.precision

    @property
    def run_dir(self) -> str:
        return run_dir(self.config)

    @property
    def checkpoint_dir(self) -> str:
        return self.config.checkpoint_dir or os.path.join(self.run_dir, "checkpoints")


def run_dir(config: RunConfig) -> str:
    return os.path.join(config.logdir, config.run_name or default_run_name(config))


def default_run_name(config: RunConfig) -> str:
    spread = "" if config.strategy == "none" else f"-{config.strategy}{config.devices or ''}"
    return f"{config.task}-{config.model_api}-{config.mode}-{config.precision}{spread}-seed{config.seed}"


def plan(config: RunConfig, strategy=None, data: tuple | None = None) -> Plan:
    """Check the flags, load the data (unless `data`, load_data's pair, is given), make and build the Trainer;
    raises UsageError or DataError. `strategy`: the tf.distribute strategy for `config.strategy` (made first:
    devices are set before any op)."""
    task = check(config)
    train, evaluation = data or load_data(config)
    batch_size = config.batch_size or task.batch_size or len(train.x)
    if batch_size > len(train.x):
        raise UsageError(f"--batch-size {batch_size} is larger than the {len(train.x)} training examples: "
                         f"use at most {len(train.x)}")
    steps_per_epoch = len(train.x) // batch_size
    total_steps = (config.epochs or task.epochs) * steps_per_epoch
    if config.steps_per_call:
        steps_per_call = min(config.steps_per_call, total_steps)
    else:
        # Whole calls per epoch where possible, so epoch ends fall on call ends; full-batch tasks
        # (one step per epoch) group steps across epochs instead.
        span = steps_per_epoch if steps_per_epoch > 1 else total_steps
        steps_per_call = largest_divisor_at_most(span, task.steps_per_call)
    total_steps = math.ceil(total_steps / steps_per_call) * steps_per_call
    tensorboard.check_options(config.profile_steps, config.summary_every, total_steps)
    learning_rate = config.learning_rate or task.learning_rate
    trainer = tasks.trainer_for(task, model_api=config.model_api, reg=Regularization(config.l2, config.dropout),
                                learning_rate=learning_rate, precision=config.precision, mode=config.mode,
                                steps_per_call=steps_per_call, seed=config.seed, preflight=config.preflight,
                                strategy=strategy)
    feed = trainer.feed(train, batch_size=batch_size)
    p = Plan(config, task, train, evaluation, batch_size, learning_rate, steps_per_epoch, steps_per_call,
             total_steps, trainer, feed)
    trainer.build(feed, resume_from=p.checkpoint_dir if config.resume else None)
    return p


def load_data(config: RunConfig) -> tuple[pipelines.Arrays, pipelines.Arrays]:
    """The (train, eval) rows of the task's dataset; announced as a phase, with the parse's own progress."""
    task = tasks.TASKS[config.task]
    where = config.data_dir or os.environ.get("FASTCORE_DATA_DIR")
    with phases.phase(f"preparing data: {task.dataset} from {where or 'tfds'}", own_line=True):   # a parse shows progress
        return tuple(pipelines.load(task.dataset, split, config.data_dir, config.seed)
                     for split in (config.train_split or task.train_split, config.eval_split or task.eval_split))


def data_needs_tensorflow(config: RunConfig) -> bool:
    """Whether loading the task's data starts TensorFlow (tfds does; local files and generated sets do not),
    which fixes the thread count: then the data is loaded after `--threads auto` has decided."""
    dataset = tasks.TASKS[config.task].dataset
    return dataset in pipelines.FILE_DATASETS and not (config.data_dir or os.environ.get("FASTCORE_DATA_DIR"))


def check(config: RunConfig):
    """The flag checks that need no data and no TensorFlow (run before threads are chosen); returns the task."""
    if config.task not in tasks.TASKS:
        raise UsageError(f"unknown task {config.task!r}: choose one of {', '.join(tasks.TASKS)}")
    task = tasks.TASKS[config.task]
    _check_positive(config)
    if not 0 <= config.dropout < 1:
        raise UsageError(f"--dropout {config.dropout} is outside [0, 1): it is the share of units dropped")
    if config.l2 < 0:
        raise UsageError(f"--l2 {config.l2} is negative: use 0 for none or a small positive weight like 1e-3")
    if config.model_api not in MODEL_APIS:
        raise UsageError(f"unknown --model-api {config.model_api!r}: choose one of {', '.join(MODEL_APIS)}")
    if not 0 <= config.seed <= MAX_SEED:
        raise UsageError(f"--seed {config.seed} is outside 0 to {MAX_SEED} (the range numpy and TensorFlow seed from)")
    name = config.run_name
    if name is not None and (name in (".", "..") or any(sep and sep in name for sep in ("/", os.sep, os.altsep))):
        raise UsageError(f"--run-name {name!r} must name one folder inside --logdir (no path separator, no '..'): "
                         f"put the path in --logdir instead")
    for flag, folder in (("--logdir", config.logdir), ("--checkpoint-dir", config.checkpoint_dir),
                         ("the run directory", run_dir(config))):
        atomic.check_writable(flag, folder)
    if task.dataset == "higgs" and (config.data_dir or os.environ.get("FASTCORE_DATA_DIR")):
        from pipelines import rowcache   # local HIGGS is parsed into a row cache: its folder must take writes
        atomic.check_writable("the row cache folder ($FASTCORE_CACHE_DIR)", rowcache.cache_dir())
    return task


def _check_positive(config: RunConfig) -> None:
    for flag, value in (("--learning-rate", config.learning_rate), ("--l2", config.l2), ("--dropout", config.dropout)):
        if value is not None and not math.isfinite(value):
            raise UsageError(f"{flag} {value} is not a finite number")
    for flag, value in (("--logdir", config.logdir), ("--run-name", config.run_name), ("--data-dir", config.data_dir),
                        ("--checkpoint-dir", config.checkpoint_dir)):
        try:
            (value or "").encode("utf-8")
        except UnicodeEncodeError:
            raise UsageError(f"{flag} {value!r} holds bytes that are not UTF-8, which TensorFlow cannot open: "
                             f"rename the folder or choose another") from None
    for flag, value in (("--epochs", config.epochs), ("--batch-size", config.batch_size),
                        ("--learning-rate", config.learning_rate), ("--steps-per-call", config.steps_per_call),
                        ("--checkpoint-every", config.checkpoint_every)):
        if value is not None and value <= 0:
            raise UsageError(f"{flag} {value} must be positive")
    if config.verify < 0:
        raise UsageError(f"--verify {config.verify} must be a number of steps >= 0")


def eval_batch_size(p: Plan) -> int:
    """Evaluation batches need not match training: larger ones mean fewer calls (padding keeps it exact)."""
    return min(len(p.eval.x), max(p.batch_size, 1024))
