"""How far a compiled step may stray from its eager twin: a tight tolerance, else the model's own float32 spread.

The tight rule, per tensor (a loss, a gradient, a variable after N steps): max |compiled - eager| / max |eager|
<= 1e-4. Most models meet it with room (measured here: the HIGGS MLP one step 1.3e-6, 20 Adam steps 3.0e-5;
the Keras VAE example one step 1.7e-5), and then nothing more is done.

Where the tight rule refuses correct models (measured here, random draws identical on both paths):
  - a tensor whose values are themselves rounding noise: a gradient that cancels to nearly nothing. One
    step's gradient of the Keras guide's GAN generator's dense kernel: 3.6e-3; of the Keras VAE's small
    dense kernel: 1.5e-4; a convnet's conv bias just before BatchNormalization (no true gradient, so Adam
    moves it by rounding alone), 64 steps: 1.0, all noise;
  - N training steps of a chaotic model: Adam turns gradient elements near zero into whole learning-rate
    steps, and a ReLU that rounding switches on or off puts the run on another branch. The Keras VAE
    (batch 128, 20 Adam steps, three seeds, one step per call): 8.5e-2, 5.1e-2, 7.0e-4.

The model's own spread. When a tensor exceeds the tight rule, the eager twin runs again from the same start:
once as it was, which must repeat the first eager run bit for bit (else the step draws random numbers the
twin cannot put back, and that is said instead: a spread measured on such a step would hide anything), then
twice with every nonzero float weight moved NUDGE_ULPS units in the last place, up or down by a random
pattern: how far float32 alone carries this model. A tensor then passes when |compiled - eager| <= SLACK x
the larger |nudged - eager|. Costs three more eager runs, only for models that need them.

Why 16 ulps and 4x: the worst per-tensor ratio |compiled - eager| / spread, measured here.
  Correct models: the VAE above, one nudged run at a time: 1-ulp nudges missed the compiled run's branch
  (ratio > 4, up to 5.9e4) in 8 of 12 runs (two seeds); 16-ulp nudges found it in 6 of 6 (three seeds,
  ratio <= 1.11). Through verify() (20 steps, three seeds) 0.004, 0.12, 0.48, its pre-flight 1.0; the
  guide's GAN (full size, batch 32) pre-flight 0.51, 20 steps 1.5; the BN convnet 1.02; the HIGGS MLP 0.37.
  Miscompiles: gradients 1% larger only when compiled (tests/test_verify.py's stand-in; Adam hides most of
  it) 27 after 20 HIGGS steps (216 with 1-ulp nudges; 2.05 with 256-ulp ones, which would pass it); a real
  XLA miscompile (a Keras model whose `call` is a tf.function, called inside jit_compile, wrong by whole
  units): 2.4e6 in the pre-flight, 1.05e6 in verify.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

RTOL = 1e-4
NUDGE_ULPS = 16
NUDGED_RUNS = 2
SLACK = 4.0


def relative_difference(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(max |a - b|, that / max |b|) over the finite entries; inf when the two are not finite in the same
    places (NaN on both paths agrees: the finiteness guard, not this comparison, deals with it)."""
    finite_a, finite_b = np.isfinite(a), np.isfinite(b)
    if not np.array_equal(finite_a, finite_b):
        return float("inf"), float("inf")
    if not finite_a.any():
        return 0.0, 0.0
    max_abs = float(np.max(np.abs(a[finite_a] - b[finite_b])))
    scale = float(np.max(np.abs(b[finite_b])))
    return max_abs, max_abs / scale if scale else max_abs


def nudge(engine, pattern: int) -> None:
    """Move every nonzero float trainable weight of every model NUDGE_ULPS ulps, up or down by random pattern
    number `pattern` (the same pattern every time: the verdict is reproducible; 0 moves nothing)."""
    if pattern == 0:
        return
    rng = np.random.default_rng(pattern)
    for variable in (v for m in engine.models.values() for v in m.trainable_variables):
        value = variable.numpy()
        if value.dtype not in (np.float16, np.float32, np.float64):
            continue
        signs = np.where(rng.random(value.shape) < 0.5, 1, -1).astype(value.dtype)
        signs[value == 0] = 0   # an exact zero (a fresh bias) stays exact: rounding keeps it so on both paths
        variable.assign(value + signs * NUDGE_ULPS * np.abs(np.spacing(value)))


@dataclasses.dataclass
class Judgement:
    passed: bool
    differences: dict[str, tuple[float, float]]   # tensor -> (max abs, max rel), compiled vs eager
    spread: dict[str, float] | None               # tensor -> max |nudged - eager| (None: the tight rule sufficed)
    failing: list[str]                            # tensors beyond both rules
    unrepeatable: tuple[str, float] | None = None  # (tensor, max abs) where eager did not repeat itself

    def ratio(self, name: str) -> float:
        """|compiled - eager| over the model's own spread for `name` (inf where nudges moved nothing)."""
        spread = (self.spread or {}).get(name, 0.0)
        return self.differences[name][0] / spread if spread else float("inf")


def judge(compiled: dict, eager: dict, rerun: Callable[[int], dict], tolerance: float = RTOL) -> Judgement:
    """Compare tensors by name (module docstring): the tight rule, then, for what exceeds it, the model's own
    spread. `rerun(pattern)`: the eager run again from the same start, nudged by `nudge(engine, pattern)`;
    called only if needed."""
    differences = {name: relative_difference(value, eager[name]) for name, value in compiled.items()}
    over = [name for name, (_, rel) in differences.items() if rel > tolerance]
    if not over:
        return Judgement(True, differences, None, [])
    again = rerun(0)
    if not all(np.array_equal(again[name], eager[name], equal_nan=True) for name in eager):
        moved = {name: relative_difference(again[name], eager[name])[0] for name in eager}
        worst = max(moved, key=moved.get)
        return Judgement(False, differences, None, over, unrepeatable=(worst, moved[worst]))
    runs = [rerun(pattern) for pattern in range(1, NUDGED_RUNS + 1)]
    spread = {}
    for name in compiled:
        moved = [relative_difference(run[name], eager[name])[0] for run in runs]
        spread[name] = max([m for m in moved if np.isfinite(m)], default=0.0)   # a NaN-flipping nudge sets no floor
    failing = [name for name in over if differences[name][0] > SLACK * spread[name]]
    return Judgement(not failing, differences, spread, failing)
