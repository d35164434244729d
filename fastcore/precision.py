"""Resolve `--precision` into a Keras dtype policy and a loss-scaling decision.

float16 needs dynamic loss scaling (its exponent range underflows small gradients);
bfloat16 has float32's exponent range and needs none.
"""
from __future__ import annotations

import dataclasses

import tensorflow as tf

CHOICES = ("auto", "float32", "bfloat16", "float16")

_POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}


@dataclasses.dataclass(frozen=True)
class Precision:
    name: str            # float32 | bfloat16 | float16
    reason: str          # why this precision was chosen (printed for `auto`)

    @property
    def policy(self) -> str:
        """Keras dtype policy name: variables stay float32, compute in `compute_dtype`."""
        return _POLICIES[self.name]

    @property
    def compute_dtype(self) -> tf.DType:
        return tf.as_dtype(self.name)

    @property
    def loss_scaling(self) -> bool:
        return self.name == "float16"


def cpu_flags() -> set[str]:
    """CPU feature flags from /proc/cpuinfo (empty where it does not exist)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def resolve(name: str, xla: bool) -> Precision:
    """Pick the precision; `auto` decides from the hardware and the compile path.

    On this class of CPU, XLA does not emit AMX/oneDNN bf16 kernels: a bf16 step under XLA ran
    slower than float32 (41k vs 47k HIGGS examples/s), while a plain tf.function bf16 step reached
    AMX through oneDNN (76k). So `auto` takes bfloat16 only where the graph is not XLA-compiled.
    """
    if name not in CHOICES:
        raise ValueError(f"unknown precision {name!r}: choose one of {', '.join(CHOICES)}")
    if name != "auto":
        return Precision(name, "requested")
    if tf.config.list_physical_devices("GPU"):
        return Precision("float16", "auto: a GPU is present (float16 with dynamic loss scaling)")
    amx = "amx_bf16" in cpu_flags()
    if amx and not xla:
        return Precision("bfloat16", "auto: CPU has AMX-BF16 and the step is not XLA-compiled (oneDNN uses AMX)")
    if amx:
        return Precision("float32", "auto: XLA on CPU does not use AMX, so bfloat16 would be slower than float32")
    return Precision("float32", "auto: no GPU and no AMX-BF16 on this CPU")
