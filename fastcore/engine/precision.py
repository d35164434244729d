"""Resolve `--precision` into a Keras dtype policy and a loss-scaling decision.

float16 needs dynamic loss scaling (its exponent range underflows small gradients);
bfloat16 has float32's exponent range and needs none.
"""
from __future__ import annotations

import dataclasses

CHOICES = ("auto", "float32", "bfloat16", "float16")

_POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}


@dataclasses.dataclass(frozen=True)
class Precision:
    name: str            # float32 | bfloat16 | float16
    reason: str          # why this precision was chosen (printed for `auto`)
    mode: str | None = None   # the compiled path `auto` chose for it, when not the requested one

    @property
    def policy(self) -> str:
        """Keras dtype policy name: variables stay float32, compute in `compute_dtype`."""
        return _POLICIES[self.name]

    @property
    def compute_dtype(self):
        import tensorflow as tf   # here, not at the top: the CLI reads CHOICES for --help
        return tf.as_dtype(self.name)

    @property
    def loss_scaling(self) -> bool:
        return self.name == "float16"


BF16_GAIN = 1.5   # bfloat16 must beat float32 by this much on the run's path: it costs precision


def resolve(name: str, xla: bool, graph_bf16: bool = False) -> Precision:
    """Pick the precision; `auto` decides from the machine's measured matmul peaks on the run's path.

    The peaks are fastcore.calibrate's (cached per machine). Here, an AMD EPYC with AVX512_BF16 and
    no AMX, 1024^2 per thread: graph (oneDNN) bfloat16 ~1.8x float32, XLA bfloat16 ~0.9x. XLA on
    CPU does not reach AMX either: on a Xeon with AMX, oneDNN bfloat16 ran 1,402 GFLOP/s, XLA 297.
    So with `graph_bf16` (XLA asked for, bfloat16 allowed to run as a plain graph), bfloat16 is proposed
    when either its XLA or its plain-graph (oneDNN) peak pays; which step runs is then timed
    (fastcore.engine.autoprecision).
    """
    if name not in CHOICES:
        raise ValueError(f"unknown precision {name!r}: choose one of {', '.join(CHOICES)}")
    if name != "auto":
        return Precision(name, "requested")
    import tensorflow as tf
    if tf.config.list_physical_devices("GPU"):
        return Precision("float16", "auto: a GPU is present (float16 with dynamic loss scaling)")
    from fastcore.observe import calibrate
    path = "xla" if xla else "graph"
    bf16_paths = (path, "graph") if xla and graph_bf16 else (path,)
    peaks = calibrate.peaks([("float32", path)] + [("bfloat16", p) for p in bf16_paths])
    f32 = peaks[f"float32/{path}"][0]
    bf16 = max(peaks[f"bfloat16/{p}"][0] for p in bf16_paths)
    measured = (f"{path} matmul peak float32 {f32:.0f}, bfloat16 "
                + ", ".join(f"{p} {peaks[f'bfloat16/{p}'][0]:.0f}" for p in bf16_paths) + " GFLOP/s"
                + (", noisy, not cached" if any(rate.noise for rate in peaks.values()) else ""))
    if bf16 >= BF16_GAIN * f32:
        return Precision("bfloat16", f"auto: {measured}, >= {BF16_GAIN:g}x")
    return Precision("float32", f"auto: {measured}, under the {BF16_GAIN:g}x that pays for bfloat16's precision")
