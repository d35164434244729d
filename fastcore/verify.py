"""Equivalence of a compiled step and its eager twin, with dtype-aware verdicts.

Both runs start from one saved state (the compiled model's variables copied into the eager one)
and consume one fixed list of batches. float32 must agree to a tight relative tolerance.
bfloat16/float16 round differently on the two paths and drift apart, so each is compared with a
float32 eager reference instead: the compiled run passes when it is about as close to the
reference as the eager run is.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from fastcore.precision import Precision

FLOAT32_RTOL = 1e-4       # measured here: ~1e-6 after 20 HIGGS steps; 100x headroom
LOW_PRECISION_SLACK = 2.0  # compiled may be up to 2x further from the reference than eager...
LOW_PRECISION_FLOOR = {"bfloat16": 5e-2, "float16": 5e-3}  # ...or within this, whichever is larger


@dataclasses.dataclass
class Difference:
    name: str
    max_abs: float
    max_rel: float       # max |a - b| / max |b|


@dataclasses.dataclass
class Report:
    precision: str
    steps: int
    passed: bool
    verdict: str
    compiled_vs_eager: list[Difference]
    compiled_vs_reference: list[Difference] | None = None
    eager_vs_reference: list[Difference] | None = None

    def to_json(self) -> dict:
        out = {"precision": self.precision, "steps": self.steps, "passed": self.passed, "verdict": self.verdict,
               "compiled_vs_eager": [dataclasses.asdict(d) for d in self.compiled_vs_eager]}
        if self.compiled_vs_reference is not None:
            out["compiled_vs_reference"] = [dataclasses.asdict(d) for d in self.compiled_vs_reference]
            out["eager_vs_reference"] = [dataclasses.asdict(d) for d in self.eager_vs_reference]
        return out

    def lines(self) -> list[str]:
        """A per-variable table and the verdict, for the terminal."""
        rows = [f"verify ({self.precision}, {self.steps} steps): {'PASS' if self.passed else 'FAIL'}"]
        if self.compiled_vs_reference is None:
            rows.append(f"  {'variable':<32} {'max abs diff':>13} {'max rel diff':>13}  (tolerance rel {FLOAT32_RTOL:g})")
            rows += [f"  {d.name:<32} {d.max_abs:>13.3e} {d.max_rel:>13.3e}" for d in self.compiled_vs_eager]
        else:
            rows.append(f"  {'variable':<32} {'compiled-ref':>13} {'eager-ref':>13} {'compiled-eager':>15}  (max rel diff)")
            for c, e, ce in zip(self.compiled_vs_reference, self.eager_vs_reference, self.compiled_vs_eager):
                rows.append(f"  {c.name:<32} {c.max_rel:>13.3e} {e.max_rel:>13.3e} {ce.max_rel:>15.3e}")
        rows.append(f"  {self.verdict}")
        return rows


def snapshot(step, losses: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """The loss trajectory and every trainable variable, as float64 arrays."""
    named = [(getattr(v, "path", None) or v.name, v) for v in step.model.trainable_variables]
    return [("loss (per call)", losses)] + [(name, np.asarray(v.numpy(), np.float64)) for name, v in named]


def copy_state(source, target) -> None:
    """Give `target` the exact variables of `source`: weights and dropout RNG state (same architecture)."""
    for src, dst in zip(source.model.variables, target.model.variables):
        dst.assign(src)


def run_steps(step, batches: list, stacked: bool) -> np.ndarray:
    """Per-call losses of `step` over the batches ([K,B,...] each when stacked)."""
    fn = step.train_many if stacked else step.train_one
    return np.array([float(fn(x, y)) for x, y in batches])


def compare(a, b) -> list[Difference]:
    diffs = []
    for (name, x), (_, y) in zip(a, b):
        max_abs = float(np.max(np.abs(x - y))) if x.size else 0.0
        scale = float(np.max(np.abs(y))) if y.size else 0.0
        diffs.append(Difference(name, max_abs, max_abs / scale if scale else max_abs))
    return diffs


def verify(make_step, batches: list, precision: Precision, mode: str, stacked: bool) -> Report:
    """Run `batches` through a compiled (`mode`) and an eager step from one saved state and compare.

    `make_step(precision, mode)` builds a fresh model+optimizer+step; `batches` is a list of
    (x, y), stacked [K,B,...] when `stacked`.
    """
    steps = sum(int(x.shape[0]) if stacked else 1 for x, _ in batches)
    low_precision = precision.name != "float32"
    compiled = make_step(precision, mode)
    eager = make_step(precision, "eager")
    reference = make_step(Precision("float32", "reference"), "eager") if low_precision else None
    for twin in (eager, reference):
        if twin is not None:
            copy_state(compiled, twin)

    comp = snapshot(compiled, run_steps(compiled, batches, stacked))
    eag = snapshot(eager, run_steps(eager, batches, stacked))
    compiled_vs_eager = compare(comp, eag)
    if not low_precision:
        worst = max(compiled_vs_eager, key=lambda d: d.max_rel)
        passed = worst.max_rel <= FLOAT32_RTOL
        verdict = (f"compiled and eager agree: worst relative difference {worst.max_rel:.2e} ({worst.name}) "
                   f"{'<=' if passed else '>'} tolerance {FLOAT32_RTOL:g}")
        return Report("float32", steps, passed, verdict, compiled_vs_eager)

    ref = snapshot(reference, run_steps(reference, batches, stacked))
    c_ref, e_ref = compare(comp, ref), compare(eag, ref)
    worst_c = max(d.max_rel for d in c_ref)
    worst_e = max(d.max_rel for d in e_ref)
    floor = LOW_PRECISION_FLOOR[precision.name]
    passed = worst_c <= max(LOW_PRECISION_SLACK * worst_e, floor)
    verdict = (f"{precision.name}: worst relative distance from the float32 reference is {worst_c:.2e} compiled, "
               f"{worst_e:.2e} eager; " +
               ("the compiled run is as close to float32 as the eager run" if passed else
                f"the compiled run drifts more than {LOW_PRECISION_SLACK:g}x the eager run's distance and over {floor:g}"))
    return Report(precision.name, steps, passed, verdict, compiled_vs_eager, c_ref, e_ref)
