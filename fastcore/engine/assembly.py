"""Model and optimizer assembly: from what the user passed to built models, optimizers and an Engine.

The user passes models and optimizers built or as factories, one or a dict of named ones, a loss or a step
function, and maybe a tf.distribute strategy. `Assembly` checks that once, then builds what a run, a twin
or a timing needs: models under a precision's Keras dtype policy (and the strategy's scope), optimizers
wrapped for loss scaling (or fresh clones for twins), and the Engine that compiles the step.
"""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Mapping

import keras
import tensorflow as tf

from fastcore.engine.loss_step import loss_eval, loss_step, named_metrics
from fastcore.engine.metrics import Metrics
from fastcore.engine.precision import Precision
from fastcore.engine.step import Engine
from fastcore.errors import UsageError


class Assembly:
    """What a Trainer was given, checked once; builds models, optimizers and engines from it."""

    def __init__(self, model, optimizer, loss=None, metrics=None, step: Callable | None = None,
                 eval_step: Callable | None = None, seed: int = 0, strategy=None, mode: str = "xla",
                 loss_weights=None, weighted_metrics=None, max_shapes: int = 8):
        if (loss is None) == (step is None):
            raise UsageError("give either loss= (fastcore writes the step) or step= (your step function), not "
                             + ("both" if loss is not None else "neither"))
        self.model_specs = named(model, "model")
        self.optimizer_specs = named(optimizer, "optimizer")
        for name, opt in self.optimizer_specs.items():
            if not hasattr(opt, "apply_gradients"):
                raise UsageError(f"optimizer {name!r} ({type(opt).__name__}) has no apply_gradients method")
        if loss is not None and len(self.model_specs) != 1:
            raise UsageError("loss= trains one model; with several models, write a step function (step=)")
        self.loss, self.metrics = loss, named_metrics(metrics)
        self.loss_weights, self.weighted_metrics = loss_weights, named_metrics(weighted_metrics)
        self.step_fn, self.eval_fn = step, eval_step
        self.seed, self.strategy, self.max_shapes = seed, strategy, max_shapes
        self._probe: dict | None = None   # the models as built once in float32 to be looked at
        if strategy is not None:
            check_distributable(strategy, self.model_specs, self.optimizer_specs, mode)

    @property
    def factories(self) -> bool:
        """Whether every model is a factory (then fastcore can build it again in another precision)."""
        return all(is_factory(m) for m in self.model_specs.values())

    def scope(self, distributed: bool):
        """The strategy's scope for the run's own variables; none for single-device twins and timing."""
        return self.strategy.scope() if distributed and self.strategy is not None else contextlib.nullcontext()

    def models(self, precision: Precision, distributed: bool = False) -> dict:
        """The models by name: factories called under `precision`'s dtype policy (seeded), built ones as given."""
        built = {}
        previous = keras.config.dtype_policy()
        keras.config.set_dtype_policy(precision.policy)
        try:
            with self.scope(distributed):
                keras.utils.set_random_seed(self.seed)
                for name, spec in self.model_specs.items():
                    built[name] = spec() if is_factory(spec) else spec
                if len(built) == 1 and isinstance(next(iter(built.values())), Mapping):
                    built = dict(next(iter(built.values())))   # one factory that builds several named models
        finally:
            keras.config.set_dtype_policy(previous)
        for name, m in built.items():
            if not hasattr(m, "trainable_variables"):
                raise UsageError(f"model {name!r} ({type(m).__name__}) has no trainable_variables: pass a Keras "
                                 f"model, a tf.Module, or a factory returning one")
            if not m.trainable_variables:
                raise UsageError(f"model {name!r} has no trainable variables yet: build it (call it once on an "
                                 f"example batch, or give keras.Input) before training")
        return built

    def probe_models(self) -> dict:
        """The models to look at (not train): factories built once, in float32, and kept; built ones as given."""
        if self._probe is None:
            self._probe = self.models(Precision("float32", "probe")) if self.factories else self.model_specs
        return self._probe

    def convolutional(self) -> bool:
        """Whether any model has a convolution layer."""
        layers = [layer for m in self.probe_models().values() if hasattr(m, "_flatten_layers")
                  for layer in m._flatten_layers(include_self=False)]
        return any(kind.__name__.startswith(("Conv", "BaseConv", "BaseDepthwiseConv", "BaseSeparableConv"))
                   for layer in layers for kind in type(layer).__mro__)

    def unrolls_xla_steps(self) -> bool:
        """Whether K-step XLA calls unroll their steps (Engine._steps): a convolutional model on a machine
        without a GPU, where XLA:CPU's while loop hides convolutions from the pass that makes them fast."""
        return self.convolutional() and not tf.config.list_physical_devices("GPU")

    def describe(self) -> str:
        """The models' kinds and variable shapes: what a cached timing of their step is keyed by."""
        return ";".join(f"{n}:{type(m).__name__}:" + ",".join(str(v.shape) for v in getattr(m, "trainable_variables", ()))
                        for n, m in self.probe_models().items())

    def check_policy(self, models: dict, precision: Precision) -> None:
        """A model passed built must have been built under `precision`'s dtype policy (a factory is built so)."""
        if precision.name == "float32" or self.factories:
            return
        policy = getattr(next(iter(models.values())), "dtype_policy", None)
        if policy is not None and getattr(policy, "name", None) != precision.policy:
            raise UsageError(f"precision {precision.name} needs the model built under the {precision.policy} "
                             f"policy: pass a factory (a function returning the model) and fastcore builds it so")

    def optimizers(self, precision: Precision, fresh: bool = False, distributed: bool = False) -> dict:
        """The run's optimizers (float16: each in a LossScaleOptimizer). `fresh` clones them (twins, timing);
        under a strategy they are always clones made in its scope, where their variables must be created."""
        out = {}
        with self.scope(distributed):
            for name, opt in self.optimizer_specs.items():
                opt = clone_optimizer(opt) if fresh or (distributed and self.strategy is not None) else opt
                if precision.loss_scaling and not isinstance(opt, keras.optimizers.LossScaleOptimizer):
                    if not isinstance(opt, keras.optimizers.Optimizer):
                        raise UsageError(f"float16 needs dynamic loss scaling: optimizer {name!r} must be a Keras "
                                         f"optimizer (wrapped in keras.optimizers.LossScaleOptimizer by fastcore)")
                    opt = keras.optimizers.LossScaleOptimizer(opt)
                out[name] = opt
        return out

    def engine(self, precision: Precision, mode: str, batch_size: int, models: dict, optimizers: dict,
               distributed: bool = False) -> Engine:
        """The Engine for these models and optimizers: the user's step, or the one fastcore writes for loss=."""
        step_fn, eval_fn = self.step_fn, self.eval_fn
        if self.loss is not None:
            model = next(iter(models.values()))
            metrics = Metrics(self.metrics, self.weighted_metrics)
            train_metrics = None if distributed and self.strategy is not None else metrics
            step_fn = loss_step(model, self.loss, metrics=train_metrics, loss_weights=self.loss_weights)
            eval_fn = loss_eval(model, self.loss, metrics, loss_weights=self.loss_weights)
        settings = dict(eval_fn=eval_fn, mode=mode, global_batch_size=batch_size, seed=self.seed,
                        loss_scaling=precision.loss_scaling, max_shapes=self.max_shapes,
                        unroll_steps=mode == "xla" and self.unrolls_xla_steps())
        if distributed and self.strategy is not None:
            from fastcore.engine.distributed import DistributedEngine
            return DistributedEngine(self.strategy, models, optimizers, step_fn, **settings)
        return Engine(models, optimizers, step_fn, **settings)

    def twin(self, precision: Precision, mode: str, batch_size: int, apart_from: dict | None = None) -> Engine:
        """A single-device engine with fresh models and optimizers (twins, references, timing); a factory
        that hands back one of `apart_from`'s models (lambda: model) is refused: the twin would train it."""
        models = self.models(precision)
        if any(m is run_model for m in models.values() for run_model in (apart_from or {}).values()):
            raise UsageError("the model factory returns the same model each time (lambda: model): a reference "
                             "twin needs a function that builds a new one")
        return self.engine(precision, mode, batch_size, models, self.optimizers(precision, fresh=True))


def is_factory(spec) -> bool:
    return callable(spec) and not hasattr(spec, "trainable_variables")


def named(value, what: str) -> dict:
    """A dict of named models or optimizers from one or a dict of them."""
    if isinstance(value, Mapping):
        if not value:
            raise UsageError(f"no {what}: give one, or a dict of named ones")
        return dict(value)
    if value is None:
        raise UsageError(f"no {what} given")
    return {what: value}


def check_distributable(strategy, model_specs: dict, optimizer_specs: dict, mode: str) -> None:
    """What a strategy needs, refused up front in one line each."""
    if not isinstance(strategy, tf.distribute.Strategy):
        raise UsageError(f"strategy={type(strategy).__name__}: give a tf.distribute.Strategy (or None for one device)")
    if not all(is_factory(m) for m in model_specs.values()):
        raise UsageError("under a strategy, pass each model as a factory (a function returning it): its variables "
                         "must be created under strategy.scope(), so fastcore builds it there")
    for name, opt in optimizer_specs.items():
        if not isinstance(getattr(opt, "inner_optimizer", opt), keras.optimizers.Optimizer):
            raise UsageError(f"under a strategy, optimizer {name!r} must be a Keras optimizer: its apply_gradients "
                             f"all-reduces the replicas' gradients ({type(opt).__name__} would update each replica "
                             f"apart, silently)")
    if mode == "eager":
        raise UsageError("mode='eager' is the single-device reference twin: under a strategy use 'xla' or 'graph'")


def clone_optimizer(opt):
    """A fresh optimizer with `opt`'s settings (for the float32 reference twin and auto's timing)."""
    if isinstance(opt, keras.optimizers.LossScaleOptimizer):
        opt = opt.inner_optimizer
    if isinstance(opt, keras.optimizers.Optimizer):
        return type(opt).from_config(opt.get_config())
    return copy.deepcopy(opt)
