"""Assemble one training run from a RunConfig: data, precision, model, optimizer, step, loop.

The CLI is a thin shell over `train`; tests and benchmarks call these functions directly.
"""
from __future__ import annotations

import dataclasses
import math
import os

import keras

import pipelines
from fastcore import autoprecision, checkpoint, models, profiling, tasks
from fastcore.errors import UsageError
from fastcore.loop import Loop
from fastcore.precision import Precision, resolve
from fastcore.step import Step


@dataclasses.dataclass
class RunConfig:
    task: str
    data_dir: str | None = None
    epochs: int | None = None
    batch_size: int | None = None
    learning_rate: float | None = None
    model_api: str = "keras-functional"
    mode: str = "xla"                 # xla | graph | eager
    precision: str = "auto"
    steps_per_call: int | None = None
    verify: int = 0
    l2: float = 0.0
    dropout: float = 0.0
    seed: int = 0
    logdir: str = "profiles"
    run_name: str | None = None
    train_split: str | None = None
    eval_split: str | None = None
    checkpoint_dir: str | None = None   # default: <run_dir>/checkpoints
    checkpoint_every: int | None = None  # steps; default: one epoch
    resume: bool = False
    deterministic: bool = False
    profile_steps: str | None = None    # "A:B": profiler trace of steps A..B (from 1), see fastcore.profiling
    summary_every: int | None = None    # compiled calls between TensorBoard scalar writes (default 1)


@dataclasses.dataclass
class Plan:
    """Everything decided before the first step: resolved task, data, precision and step counts."""
    config: RunConfig
    task: tasks.Task
    precision: Precision
    train: pipelines.Arrays
    eval: pipelines.Arrays
    batch_size: int
    learning_rate: float
    steps_per_epoch: int
    steps_per_call: int
    total_steps: int

    @property
    def run_dir(self) -> str:
        return os.path.join(self.config.logdir, self.config.run_name or default_run_name(self.config))

    @property
    def checkpoint_dir(self) -> str:
        return self.config.checkpoint_dir or os.path.join(self.run_dir, "checkpoints")


def default_run_name(config: RunConfig) -> str:
    return f"{config.task}-{config.model_api}-{config.mode}-{config.precision}-seed{config.seed}"


def largest_divisor_at_most(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def plan(config: RunConfig) -> Plan:
    """Check the flags, load the data and fix the step counts; raises UsageError or DataError."""
    if config.task not in tasks.TASKS:
        raise UsageError(f"unknown task {config.task!r}: choose one of {', '.join(tasks.TASKS)}")
    task = tasks.TASKS[config.task]
    _check_positive(config)
    if not 0 <= config.dropout < 1:
        raise UsageError(f"--dropout {config.dropout} is outside [0, 1): it is the share of units dropped")
    if config.l2 < 0:
        raise UsageError(f"--l2 {config.l2} is negative: use 0 for none or a small positive weight like 1e-3")
    if config.model_api not in models.MODEL_APIS:
        raise UsageError(f"unknown --model-api {config.model_api!r}: choose one of {', '.join(models.MODEL_APIS)}")
    for flag, folder in (("--logdir", config.logdir), ("--checkpoint-dir", config.checkpoint_dir)):
        _check_writable(flag, folder)
    precision = resolve(config.precision, xla=config.mode == "xla")
    train = pipelines.load(task.dataset, config.train_split or task.train_split, config.data_dir, config.seed)
    evaluation = pipelines.load(task.dataset, config.eval_split or task.eval_split, config.data_dir, config.seed)
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
    profiling.check_config(config, total_steps)
    p = Plan(config, task, precision, train, evaluation, batch_size,
             config.learning_rate or task.learning_rate, steps_per_epoch, steps_per_call, total_steps)
    recorded = checkpoint.recorded_precision(p.checkpoint_dir) if config.resume else None
    if config.precision == "auto" and recorded:   # a resumed run keeps the precision it was trained in
        return dataclasses.replace(p, precision=Precision(recorded, "auto: as trained in the checkpoint it resumes"))
    return dataclasses.replace(p, precision=autoprecision.confirm(p))


def _check_positive(config: RunConfig) -> None:
    for flag, value in (("--epochs", config.epochs), ("--batch-size", config.batch_size),
                        ("--learning-rate", config.learning_rate), ("--steps-per-call", config.steps_per_call),
                        ("--checkpoint-every", config.checkpoint_every)):
        if value is not None and value <= 0:
            raise UsageError(f"{flag} {value} must be positive")
    if config.verify < 0:
        raise UsageError(f"--verify {config.verify} must be a number of steps >= 0")


def _check_writable(flag: str, folder: str | None) -> None:
    """Fail before training, not after it: the nearest existing ancestor must be a writable folder."""
    if folder is None:
        return
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UsageError(f"{flag} {folder}: {existing} is a file, not a folder; choose another {flag}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {folder}: {existing} is not writable; choose another {flag}")


def build_step(p: Plan, precision: Precision, mode: str) -> Step:
    """A fresh model + optimizer + step for `precision` and `mode`; same seed, so same initial weights."""
    keras.utils.set_random_seed(p.config.seed)
    model = models.build(p.task.model, p.config.model_api,
                         models.Regularization(p.config.l2, p.config.dropout),
                         precision.policy, precision.compute_dtype, p.config.seed)
    optimizer = tasks.make_optimizer(p.task.optimizer, p.learning_rate, precision.loss_scaling)
    return Step(model, p.task.loss, p.task.metric, optimizer, keras_free=p.config.model_api == "module",
                global_batch_size=p.batch_size, mode=mode)


def eval_batch_size(p: Plan) -> int:
    """Evaluation batches need not match training: larger ones mean fewer calls (padding keeps it exact)."""
    return min(len(p.eval.x), max(p.batch_size, 1024))


def make_loop(p: Plan, step: Step, callbacks: list) -> Loop:
    return Loop(step,
                pipelines.train_stream(p.train, p.batch_size, p.config.seed, p.steps_per_call),
                pipelines.eval_stream(p.eval, eval_batch_size(p)),
                p.total_steps, p.steps_per_epoch, p.steps_per_call, p.batch_size, callbacks)
