"""FLOPs per training example, counted from the graphs fastcore traces: any model, no formula to keep in sync.

TensorFlow's graph profiler (`tf.compat.v1.profiler`'s float_operation view) adds up the registered FLOP
counts of every op in a traced function (MatMul 2mnk, Conv2D, elementwise ops one per element...). Two
counts, both for one batch and divided by its size:
  - `flops_per_example`: 3 x the forward pass (the model and loss in inference mode, fastcore's evaluation
    graph), the usual training convention (backward ~ 2 x forward). For the built-in MLPs it equals the
    textbook 6 x sum(in x out) within 0.2% (HIGGS 4x512: 4.814 vs 4.808 MFLOP; MNIST 784-100-50-10:
    0.504 vs 0.503); utilisation uses it. A step function without an evaluation step has no separate
    forward graph: then the step graph's count below is used.
  - `step_graph_flops_per_example`: what one training step's graph really holds (forward, the gradients,
    no update). Lower than the convention where TensorFlow skips work nobody needs: the first layer's
    input gradient (MNIST: 0.347 vs 0.503 MFLOP, since 2 x 784 x 100 per example is never computed).
Counting costs traces, not execution: ~10-50 ms.
"""
from __future__ import annotations

import contextlib
import io


def count_flops(concrete_function) -> int | None:
    """Total FLOPs of one run of a traced tf.function (its ConcreteFunction); None if the profiler fails."""
    import tensorflow as tf
    from tensorflow.python.profiler import model_analyzer, option_builder
    options = option_builder.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    logger = tf.get_logger()
    level = logger.level
    logger.setLevel("ERROR")   # the profiler's own deprecation warnings are not the user's business
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            profile = model_analyzer.profile(concrete_function.graph, options=options)
    except Exception:   # the profiler is best effort: utilisation is then left out, training goes on
        return None
    finally:
        logger.setLevel(level)
    return int(profile.total_float_ops) or None


def per_example(step_graph, forward_graph, batch_size: int) -> dict:
    """{"flops_per_example", "flops_counted", "step_graph_flops_per_example"} (see the module docstring)."""
    step = count_flops(step_graph)
    forward = count_flops(forward_graph) if forward_graph is not None else None
    step = step / batch_size if step else None
    if forward:
        return {"flops_per_example": 3 * forward / batch_size, "flops_counted": "3 x the forward graph",
                "step_graph_flops_per_example": step}
    return {"flops_per_example": step, "flops_counted": "the step graph", "step_graph_flops_per_example": step}
