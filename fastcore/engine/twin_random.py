"""Random numbers in the eager twin: drawn by XLA's own kernels, from the state the compiled run started from.

Why. TensorFlow's stateless random kernels and XLA's turn the same seed into different numbers (measured
here, TF 2.21, same seed, 64x32 draws: normal 5.3 apart, uniform 0.99, truncated normal 3.5; dropout masks,
categorical draws, tf.image's random flips/brightness/hue differ; integer uniform draws, crops and seed
splits agree). Keras rides on those kernels: `keras.random.*` with a SeedGenerator (or none: the global
one), and the layers built on it (Dropout 2.0 apart, GaussianNoise 1.5, RandomFlip 0.93, RandomContrast,
RandomBrightness, SpatialDropout). Compiled and eager then see different noise, and a correct model that
draws random numbers is refused.

What. While fastcore runs the step of an XLA engine (`Engine.compute`), each TensorFlow stateless random
op called outside an XLA computation (the eager twin, or a plain tf.function it calls) runs as its own small
XLA computation of the same op on the same arguments. Measured: bit-identical to the same op fused inside
the compiled step (a checksum of every bit of normal, uniform and truncated-normal draws, consumed by
other ops in one larger XLA program). The compiled path is untouched, so training draws exactly what
Keras draws under XLA, every distribution stays the library's own, and nothing is approximated. Keras'
layers under the twin, against XLA: Dropout, GaussianDropout, SpatialDropout2D, RandomFlip, RandomBrightness
bit-identical; GaussianNoise, RandomContrast, AlphaDropout within 1.2e-7 (the arithmetic after the draw
rounds differently). RandomCrop computes something else under XLA whatever it draws (its crop has no static
shape there, so it resizes): a real difference, which the twin reports.
Rejected: routing every draw to fastcore.random's hashed generator. Its integer bits agree, but its
Box-Muller log/cos round differently compiled and eager (2.4e-7 apart), it would change the numbers
training draws, and each distribution (truncated normal, categorical, image ops) would need rewriting.

The routing is per thread (the pre-flight compiles on a second thread while the training call warms up
on the first) and is taken out of TensorFlow's modules when the last step using it returns. Ops that XLA
cannot compile (stateless gamma, Poisson, binomial, shuffle) are left alone: an XLA step cannot hold
them either.

State. A draw is only as equal as the seed it starts from: a SeedGenerator kept outside any model (in
the step's closure), Keras' global one, or a metric updated in the step are variables no model holds.
`touched_variables` lists every variable a traced step reads or writes, so the twin saves and restores
them along with the models' and optimizers'.
"""
from __future__ import annotations

import contextlib
import functools
import threading

import tensorflow as tf
from tensorflow.python.framework import ops
from tensorflow.python.ops import control_flow_util

# The draws measured to differ compiled and eager (see the module docstring), by public module.
ROUTED = {
    tf.random: ("stateless_normal", "stateless_uniform", "stateless_truncated_normal", "stateless_categorical",
                "stateless_parameterized_truncated_normal"),
    tf.nn.experimental: ("stateless_dropout",),
    tf.image: ("stateless_random_flip_left_right", "stateless_random_flip_up_down", "stateless_random_brightness",
               "stateless_random_contrast", "stateless_random_hue", "stateless_random_saturation"),
}

_lock = threading.Lock()
_users = 0
_active = threading.local()   # .depth: how many XLA-engine steps this thread is inside
_originals: dict[tuple[object, str], object] = {}
_routed: dict[tuple[object, str], object] = {}


def in_xla() -> bool:
    """Whether the op being built goes into an XLA computation (tf.function(jit_compile=True))."""
    return control_flow_util.GraphOrParentsInXlaContext(ops.get_default_graph())


def _route(original):
    compiled = tf.function(original, jit_compile=True, autograph=False)

    @functools.wraps(original)
    def draw(*args, **kwargs):
        if getattr(_active, "depth", 0) and not in_xla():
            return compiled(*args, **kwargs)
        return original(*args, **kwargs)
    return draw


@contextlib.contextmanager
def xla_draws(active: bool = True):
    """Within: this thread's stateless random draws outside XLA run as XLA computations (see module doc).
    `active=False` (an engine that does not compile with XLA) changes nothing."""
    global _users
    if not active:
        yield
        return
    with _lock:
        if _users == 0:
            for module, names in ROUTED.items():
                for name in names:
                    key = (module, name)
                    _originals[key] = getattr(module, name)
                    if key not in _routed:
                        _routed[key] = _route(_originals[key])
                    setattr(module, name, _routed[key])
        _users += 1
    _active.depth = getattr(_active, "depth", 0) + 1
    try:
        yield
    finally:
        _active.depth -= 1
        with _lock:
            _users -= 1
            if _users == 0:
                for (module, name), original in _originals.items():
                    setattr(module, name, original)
                _originals.clear()


def touched_variables(concrete_function) -> list:
    """Every variable a traced function reads or writes (RNG states, metrics, weights), in trace order."""
    return list(concrete_function.graph.variables)
