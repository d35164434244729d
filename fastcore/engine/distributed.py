"""The same step on tf.distribute: one global batch split across replicas, on one machine or several.

What is compiled where was decided by measurement (TensorFlow 2.21, CPU; MirroredStrategy over 2
logical devices and MultiWorkerMirroredStrategy over 2 loopback workers):
  - XLA cannot hold the all-reduce or the optimizer update on CPU: a jitted replica step fails with
    "Trying to access resource .../replica_1 ... from device CPU:0" (Mirrored) or "Collectives are not yet
    implemented for CPU devices when compiling with XLA" (multi-worker). So each replica's loss and
    gradients are one XLA function; the update (whose all-reduce the Keras optimizer does) runs in the
    surrounding plain tf.function, as Keras' own fit does under tf.distribute.
  - `merge_call` (inside apply_gradients) may not run in a graph other than the one `strategy.run` was
    called in, so the K-step loop and the finiteness guard's tf.cond live in that outer function, around
    `strategy.run`, never inside the replica function.
The guard stays global: every replica's loss-and-gradient sum is all-reduced before the cond, so all
replicas (and workers) take the same branch and never drift apart. Every compiled call runs under
distribute.waiting: a call stuck on a peer that stopped answering ends within the peer timeout.

Data: every replica receives the global batch and takes its own slice (replica r of R takes rows
r*B/R..(r+1)*B/R). The steps then see exactly the batches a single-device run sees, which is what the
distributed twin compares; the cost is that each worker reads every global batch (cheap for in-memory
arrays; for data larger than one host, shard the dataset by worker yourself).
"""
from __future__ import annotations

import tensorflow as tf

from fastcore import distribute
from fastcore.engine import held_state
from fastcore.engine.step import Engine, finiteness_sum
from fastcore.errors import UsageError


class DistributedEngine(Engine):
    """An Engine whose compiled calls run the step on every replica of `strategy` (see the module doc).

    Variables (models, optimizers, counters) must be created under `strategy.scope()`: the Trainer builds
    the models from their factories and re-creates the optimizers there. Losses returned by the step are
    summed over replicas (each is scaled to the global batch), other logs are averaged.
    """
    single_device = False   # every step keeps the guard: the replicas agree on it per step

    def __init__(self, strategy: tf.distribute.Strategy, models: dict, optimizers: dict, step_fn, **kwargs):
        self.strategy = strategy
        self.replicas = strategy.num_replicas_in_sync
        batch = kwargs["global_batch_size"]
        if batch % self.replicas:
            raise UsageError(f"batch size {batch} does not split evenly over {self.replicas} replicas: "
                             f"use a multiple of {self.replicas}")
        if not callable(step_fn):
            raise UsageError("step phases (a list of step functions) run on one device; under a strategy give one "
                             "step function")
        self._grad_variables: dict[str, list] = {}
        self._gather_spread = None
        with strategy.scope():
            super().__init__(models, optimizers, step_fn, **kwargs)
        # The XLA part (see the module doc); traced once per replica device, compiled once.
        self._replica_gradients = tf.function(self._gradients_of_slice, jit_compile=self.mode == "xla",
                                              autograph=False)

    @property
    def placement(self) -> str:
        """What runs where, for the run's output and summary."""
        kind = type(self.strategy).__name__
        compiled = "XLA" if self.mode == "xla" else "graph"
        reduce = "collective all-reduce across workers" if self._multi_worker else "all-reduce across local devices"
        return (f"{kind}, {self.replicas} replicas: {compiled}: loss and gradients per replica; "
                f"update: graph, {reduce}")

    @property
    def _multi_worker(self) -> bool:
        return distribute.multi_worker(self.strategy)

    def replica_seed(self):
        """Each replica draws its own random numbers (its own slice of the batch)."""
        context = tf.distribute.get_replica_context()   # None in cross-replica context (the pre-flight)
        rid = context.replica_id_in_sync_group if context is not None else 0
        return tf.constant(self.seed, tf.int64) + tf.cast(rid, tf.int64) * 1_000_003

    # -- per replica ---------------------------------------------------------------------------------
    def _slice(self, batch):
        rid = tf.distribute.get_replica_context().replica_id_in_sync_group
        per = self.global_batch_size // self.replicas
        return tf.nest.map_structure(lambda t: t[rid * per:(rid + 1) * per], batch)

    def _gradients_of_slice(self, batch):
        """Compiled per replica: (logs, {optimizer: [gradient]}, this replica's finiteness sum)."""
        logs, grads = self.compute(batch)
        self._grad_variables = {name: [v for _, v in pairs] for name, pairs in grads.items()}
        sums = finiteness_sum(self.guarded(logs), [g for pairs in grads.values() for g, _ in pairs])
        return logs, {name: [g for g, _ in pairs] for name, pairs in grads.items()}, sums

    def compute_checked(self, batch, phase: int = 0, draws: int = 0):
        """Run the step on every replica's slice; all-reduce the finiteness sum (one branch everywhere) and
        the logs, packed into one collective (see _reduce_packed)."""
        logs, grads, sums = self.strategy.run(lambda b: self._replica_gradients(self._slice(b)), args=(batch,))
        reduced, finite = self._reduce_packed(logs, sums)
        return reduced, grads, tf.math.is_finite(finite)

    def _reduce_packed(self, logs: dict, sums) -> tuple[dict, tf.Tensor]:
        """The finiteness sum and every float log of known shape summed over replicas in ONE all-reduce of a
        float32 vector; losses stay sums, other logs become means (sum / replicas, as ReduceOp.MEAN does).
        Why: TensorFlow's collective runtime keeps ~1.6 MB of native memory per 1,000 collective calls, so a
        step of the `line` task made 4; packed, 2 (this and the optimizer's gradient all-reduce). Measured over
        4,000 steps of 2 workers: RSS growth 4.27 -> 2.41 MB per 1,000 steps (worker), 8.65 -> 7.01 (chief). A
        log of another dtype or of an unknown shape is reduced alone."""
        def local(value):
            return self.strategy.experimental_local_results(value)[0]
        packable = [name for name, value in logs.items()
                    if local(value).dtype.is_floating and local(value).shape.is_fully_defined()]
        shapes = {name: local(logs[name]).shape for name in packable}

        def pack(sums, *values):
            return tf.concat([tf.reshape(tf.cast(v, tf.float32), [-1]) for v in (sums, *values)], 0)
        packed = self.strategy.run(pack, args=(sums, *[logs[name] for name in packable]))
        total = self.strategy.reduce(tf.distribute.ReduceOp.SUM, packed, axis=None)
        reduced, offset = {}, 1
        for name in logs:
            if name not in shapes:
                op = tf.distribute.ReduceOp.SUM if name in self.loss_names else tf.distribute.ReduceOp.MEAN
                reduced[name] = self.strategy.reduce(op, logs[name], axis=None)
                continue
            size = shapes[name].num_elements()
            value = tf.reshape(total[offset:offset + size], shapes[name])
            offset += size
            if name not in self.loss_names:
                value = value / self.replicas
            reduced[name] = tf.cast(value, local(logs[name]).dtype)
        return reduced, total[0]

    def _apply(self, grads) -> None:
        """apply_gradients in replica context: the Keras optimizer all-reduces (sums) the gradients."""
        def apply(per_replica):
            for name, gradients in per_replica.items():
                self.optimizers[name].apply_gradients(zip(gradients, self._grad_variables[name]))
        self.strategy.run(apply, args=(grads,))

    def _hold_model_state(self) -> held_state.Held:
        """Every non-trainable variable is held: each replica writes its own copy of a moving statistic,
        inside its own function, through a handle the outer graph does not show."""
        return held_state.hold(self.model_variables, writes_visible=False)

    def _apply_scaled(self, grads, finite) -> tf.Tensor:
        def apply(per_replica, finite):
            poison = tf.where(finite, 0.0, float("nan"))
            for name, gradients in per_replica.items():
                self.optimizers[name].apply_gradients(
                    [(g + tf.cast(poison, g.dtype), v) for g, v in zip(gradients, self._grad_variables[name])])
        self.strategy.run(apply, args=(grads, finite))
        return finite

    def _compile(self, fn):
        # Never jit_compile around strategy.run (see the module doc): the replica function is the XLA part.
        return _Watched(tf.function(fn, autograph=False), self.strategy)

    # -- agreement -----------------------------------------------------------------------------------
    def any_worker(self, flag: bool) -> bool:
        """Whether `flag` holds on any worker (one scalar all-reduce): a SIGTERM that reached one worker
        stops every worker after the same call, so their checkpoints and collectives stay in step."""
        if not self._multi_worker:
            return flag
        return distribute.replica_sums(self.strategy, [1.0 if flag else 0.0])[0] > 0

    def replica_spread(self) -> float:
        """The largest difference between any replica's (any worker's) copy of any model variable and
        replica 0's: 0.0 when every replica holds the same weights, measured, not assumed."""
        if self._gather_spread is None:   # one trace for every call (the twin, each run's end)
            variables = [v for v in self.model_variables if v.trainable]

            def gather():
                flat = tf.concat([tf.reshape(tf.cast(v, tf.float32), [-1]) for v in variables], 0)
                every = tf.distribute.get_replica_context().all_gather(flat[None], axis=0)
                return tf.reduce_max(tf.abs(every - every[0:1]))
            self._gather_spread = tf.function(gather, autograph=False)
        with distribute.waiting(self.strategy):
            spread = self.strategy.run(self._gather_spread)
        return float(max(float(v) for v in self.strategy.experimental_local_results(spread)))


class _Watched:
    """A compiled function whose calls run under distribute.waiting; anything else is the function's."""

    def __init__(self, fn, strategy):
        self._fn, self._strategy = fn, strategy

    def __call__(self, *args, **kwargs):
        with distribute.waiting(self._strategy):
            return self._fn(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._fn, name)
