"""Equivalence of a compiled step and its eager twin, with dtype-aware verdicts.

Both runs start from one saved state (every model and optimizer variable, the counters, and any other
variable the step touches, such as a SeedGenerator in its closure; put back after each run) and consume one
fixed list of batches. float32 must agree to a tight relative tolerance or, where chaos or cancellation
defeats it, within the model's own float32 spread (fastcore.engine.rounding).
bfloat16/float16 round differently on the two paths and drift apart, so each is compared with a
float32 eager reference instead: the compiled run passes when it is about as close to the
reference as the eager run is.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from fastcore.engine import rounding, twin_random
from fastcore.engine.precision import Precision
from fastcore.errors import UsageError
from fastcore.engine.rounding import relative_difference

FLOAT32_RTOL = rounding.RTOL   # measured here: ~1e-6 after 20 HIGGS steps; beyond it, the model's own spread
UNREPEATABLE = ("its random numbers come from outside TensorFlow's stateless ops (tf.random.normal, "
                "tf.random.Generator, NumPy, Python) or from state fastcore cannot put back; draw with "
                "keras.random and a SeedGenerator, or fastcore.random with ctx.seed()")
DISTRIBUTED_RTOL = {"float32": 1e-5, "bfloat16": 5e-2, "float16": 5e-3}   # distributed vs one device...
# ...or within this many times the one-device compiled-vs-eager difference. The faults the twin exists for
# are orders above it: a per-replica mean loss (gradients 2x), an optimizer made outside the scope (6.7e-4
# after 3 steps, measured), no all-reduce; re-association noise measured 1.9e-5 vs 2.1e-5 (HIGGS, 20 steps).
DISTRIBUTED_SLACK = 4.0
LOSS_SCALE_RETRIES = 2   # float16: runs again from a lower loss scale when the two scalers skipped differently
LOW_PRECISION_SLACK = 2.0  # compiled may be up to 2x further from the reference than eager...
LOW_PRECISION_FLOOR = {"bfloat16": 5e-2, "float16": 5e-3}  # ...or within this, whichever is larger


@dataclasses.dataclass
class Difference:
    name: str
    max_abs: float
    max_rel: float       # max |a - b| / max |b|
    spread: float | None = None   # float32: max |nudged eager - eager|, where the tight tolerance was exceeded


@dataclasses.dataclass
class Report:
    precision: str
    steps: int
    passed: bool
    verdict: str
    compiled_vs_eager: list[Difference]
    compiled_vs_reference: list[Difference] | None = None
    eager_vs_reference: list[Difference] | None = None
    replica_spread: float | None = None   # distributed twin: max |replica r - replica 0| over every weight

    def to_json(self) -> dict:
        out = {"precision": self.precision, "steps": self.steps, "passed": self.passed, "verdict": self.verdict,
               "compiled_vs_eager": [dataclasses.asdict(d) for d in self.compiled_vs_eager]}
        if self.compiled_vs_reference is not None:
            out["compiled_vs_reference"] = [dataclasses.asdict(d) for d in self.compiled_vs_reference]
            out["eager_vs_reference"] = [dataclasses.asdict(d) for d in self.eager_vs_reference]
        if self.replica_spread is not None:
            out = {"kind": "distributed vs one device", **out, "replica_spread": self.replica_spread}
            out["distributed_vs_single"] = out.pop("compiled_vs_eager")
        return out

    def lines(self) -> list[str]:
        """A per-variable table and the verdict, for the terminal."""
        kind = "distributed vs one device, " if self.replica_spread is not None else ""
        rows = [f"verify ({kind}{self.precision}, {self.steps} steps): {'PASS' if self.passed else 'FAIL'}"]
        if self.compiled_vs_reference is None:
            tolerance = DISTRIBUTED_RTOL[self.precision] if self.replica_spread is not None else FLOAT32_RTOL
            spread = any(d.spread is not None for d in self.compiled_vs_eager)
            rows.append(f"  {'variable':<32} {'max abs diff':>13} {'max rel diff':>13}" + (f" {'own spread':>13}" if spread else "")
                        + f"  (tolerance rel {tolerance:g}" + (f", or {rounding.SLACK:g}x own spread)" if spread else ")"))
            rows += [f"  {d.name:<32} {d.max_abs:>13.3e} {d.max_rel:>13.3e}" + (f" {d.spread:>13.3e}" if spread else "")
                     for d in self.compiled_vs_eager]
        else:
            rows.append(f"  {'variable':<32} {'compiled-ref':>13} {'eager-ref':>13} {'compiled-eager':>15}  (max rel diff)")
            for c, e, ce in zip(self.compiled_vs_reference, self.eager_vs_reference, self.compiled_vs_eager):
                rows.append(f"  {c.name:<32} {c.max_rel:>13.3e} {e.max_rel:>13.3e} {ce.max_rel:>15.3e}")
        rows.append(f"  {self.verdict}")
        return rows


def snapshot(engine, losses: np.ndarray, every_variable: bool = False) -> list[tuple[str, np.ndarray]]:
    """The loss trajectory and every trainable variable of every model, as float64 arrays; with
    `every_variable`, the non-trainable ones too (BatchNormalization's moving statistics, RNG states)."""
    named = [(getattr(v, "path", None) or v.name, v) for m in engine.models.values()
             for v in (m.variables if every_variable else m.trainable_variables)]
    return [("loss (per call)", losses)] + [(name, np.asarray(v.numpy(), np.float64)) for name, v in named]


class SavedState:
    """Every variable a step changes (models, optimizers, counters, and `touched`: the variables a traced
    step reads or writes, e.g. a SeedGenerator kept in its closure), copied so it can be put back."""

    def __init__(self, engine, touched=()):
        self.variables = engine.state_variables
        held = {id(v.handle) for v in self.variables}
        self.extra = [v for v in touched if id(v.handle) not in held]   # no model or optimizer holds these
        self.variables += self.extra
        self.values = [v.numpy() for v in self.variables]

    def restore(self) -> None:
        for v, value in zip(self.variables, self.values):
            v.assign(value)



def copy_state(source, target) -> None:
    """Give `target` (same architecture, e.g. the float32 reference twin) `source`'s state: model variables,
    the optimizers' own variables (inside any loss-scale wrapper) and the step counters."""
    def inner(opt):
        return list(getattr(getattr(opt, "inner_optimizer", opt), "variables", None) or [])

    pairs = list(zip(source.model_variables, target.model_variables))
    for a, b in zip(source.optimizers.values(), target.optimizers.values()):
        pairs += list(zip(inner(a), inner(b)))
    pairs += [(source.steps, target.steps), (source.applied, target.applied)]
    for src, dst in pairs:
        dst.assign(tf.cast(src, dst.dtype))


def run_steps(engine, batches: list, stacked: bool, compiled: bool) -> np.ndarray:
    """Per-call first-loss values over the batches ([K,B,...] leaves when stacked)."""
    if compiled:
        fn = engine.train_many if stacked else engine.train_one
    else:
        fn = engine.train_call_many if stacked else engine.train_call_one
    return np.array([float(next(iter(fn(batch).values()))) for batch in batches])


def compare(a, b) -> list[Difference]:
    return [Difference(name, *relative_difference(x, y)) for (name, x), (_, y) in zip(a, b)]


def verify(engine, batches: list, precision: Precision, stacked: bool, reference=None) -> Report:
    """Run `batches` through `engine` compiled and eagerly from one saved state, and compare the losses and
    every model variable, BatchNormalization's moving statistics included.

    The engine's state is put back afterwards, so verifying changes nothing. `batches` is a list of
    batches (K stacked when `stacked`). For bfloat16/float16, `reference` is a float32 engine of the
    same architecture (its eager run is the yardstick both runs are measured against).
    """
    steps = sum(int(tf.nest.flatten(b)[0].shape[0]) if stacked else 1 for b in batches)
    low_precision = precision.name != "float32"
    train = engine.train_many_function() if stacked else engine.train_one
    touched = twin_random.touched_variables(train.get_concrete_function(batches[0])) if engine.mode != "eager" else ()
    state = SavedState(engine, touched)
    comp = snapshot(engine, run_steps(engine, batches, stacked, compiled=engine.mode != "eager"), every_variable=True)
    state.restore()
    eag = snapshot(engine, run_steps(engine, batches, stacked, compiled=False), every_variable=True)
    state.restore()
    if not low_precision:
        def rerun(pattern):
            rounding.nudge(engine, pattern)
            try:
                return dict(snapshot(engine, run_steps(engine, batches, stacked, compiled=False), every_variable=True))
            finally:
                state.restore()
        return _float32_report(steps, rounding.judge(dict(comp), dict(eag), rerun))
    compiled_vs_eager = compare(comp, eag)

    if reference is None:
        raise ValueError("a bfloat16/float16 verify needs a float32 reference engine")
    copy_state(engine, reference)
    ref = snapshot(reference, run_steps(reference, batches, stacked, compiled=False), every_variable=True)
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


def _float32_report(steps: int, judgement: rounding.Judgement) -> Report:
    spread = judgement.spread or {}
    differences = [Difference(name, a, r, spread.get(name)) for name, (a, r) in judgement.differences.items()]
    worst = max(differences, key=lambda d: d.max_rel)
    tight = f"worst relative difference {worst.max_rel:.2e} ({worst.name})"
    nudged = f"eager runs from starts nudged {rounding.NUDGE_ULPS} ulps"
    if judgement.unrepeatable:
        name, moved = judgement.unrepeatable
        verdict = (f"compiled and eager cannot be compared: {tight} > tolerance {FLOAT32_RTOL:g}, and the eager "
                   f"run does not repeat itself from the same state ({name} moved by {moved:.3g}): {UNREPEATABLE}")
    elif judgement.spread is None:
        verdict = f"compiled and eager agree: {tight} <= tolerance {FLOAT32_RTOL:g}"
    elif judgement.passed:
        over = [n for n, (_, r) in judgement.differences.items() if r > FLOAT32_RTOL]
        verdict = (f"compiled and eager agree: {tight} > tolerance {FLOAT32_RTOL:g}, but every variable over it is "
                   f"within {rounding.SLACK:g}x the model's own float32 spread ({nudged}; worst "
                   f"{max(judgement.ratio(n) for n in over):.2g}x)")
    else:
        bad = max(judgement.failing, key=judgement.ratio)
        verdict = (f"compiled and eager disagree: {bad} differs by {judgement.differences[bad][0]:.3g} "
                   f"({judgement.differences[bad][1]:.2e} relative > tolerance {FLOAT32_RTOL:g}), "
                   f"{judgement.ratio(bad):.3g}x the model's own float32 spread ({spread[bad]:.3g}: {nudged}; "
                   f"allowed {rounding.SLACK:g}x): a miscompile")
    return Report("float32", steps, judgement.passed, verdict, differences)


def verify_distributed(engine, single, batches: list, precision: Precision, stacked: bool) -> Report:
    """The distributed twin: `engine` (a DistributedEngine) and `single` (the same step on one device, same
    precision and mode) run the same global batches from one state; every weight is compared, and every
    replica's (worker's) copy against replica 0's. The distributed engine's state is put back afterwards.

    Splitting a batch re-associates its sums (two half-batch gradients all-reduced, not one), and Adam
    magnifies that on weights near zero (measured on HIGGS after 20 steps: a bias 1.9e-5 relative apart,
    while one-device compiled and eager runs differ by 2.1e-5 on it). So a difference above the tolerance is judged against the same re-association noise
    measured on one device: the single-device run compiled vs eager. Distribution passes when it adds no
    more than DISTRIBUTED_SLACK times what compiling alone does."""
    steps = sum(int(tf.nest.flatten(b)[0].shape[0]) if stacked else 1 for b in batches)
    state = SavedState(engine)
    copy_state(engine, single)
    start = SavedState(single)
    skipped_before, alone_before = engine.skipped_steps, single.skipped_steps
    note, lower = "", None
    for _ in range(LOSS_SCALE_RETRIES + 1):
        distributed = snapshot(engine, run_steps(engine, batches, stacked, compiled=True))
        spread, skipped = engine.replica_spread(), engine.skipped_steps - skipped_before
        scales = _loss_scales(engine)
        state.restore()
        one_device = snapshot(single, run_steps(single, batches, stacked, compiled=True))
        alone = single.skipped_steps - alone_before
        if skipped == alone:
            break
        # float16: a half batch overflows less often than the whole one, so the two loss scalers skipped
        # different steps and the runs are not comparable; compare again from the lower scale both reached.
        lower = min(scales + _loss_scales(single))
        note = (f"; float16: the loss scaler skipped {skipped} step(s) distributed and {alone} on one device, so "
                f"both ran again from loss scale {lower:g}")
        start.restore()
        _set_loss_scale((engine, single), lower)
    differences = compare(distributed, one_device)
    worst = max(differences, key=lambda d: d.max_rel)
    tolerance = DISTRIBUTED_RTOL[precision.name]
    noise = None
    if worst.max_rel > tolerance:
        start.restore()
        _set_loss_scale((single,), lower)
        noise = max(d.max_rel for d in compare(one_device, snapshot(single, run_steps(single, batches, stacked, False))))
    limit = tolerance if noise is None else max(tolerance, DISTRIBUTED_SLACK * noise)
    agree = worst.max_rel <= limit
    passed = agree and spread == 0.0
    verdict = (f"{engine.replicas} replicas and one device {'agree' if agree else 'disagree'}: worst relative "
               f"difference {worst.max_rel:.2e} ({worst.name}) {'<=' if agree else '>'} {limit:.2g}"
               + ("" if noise is None else f" ({DISTRIBUTED_SLACK:g}x the one-device compiled-vs-eager "
                                           f"difference {noise:.2e}, as the tolerance {tolerance:g} was exceeded)")
               + "; replicas " + ("identical (spread 0.0)" if spread == 0.0 else f"DIFFER from replica 0 by up to {spread:.3e}")
               + note)
    if not passed:
        verdict += ("; check that each loss is summed and divided by ctx.global_batch_size (not averaged per "
                    "replica), and that random layers are off or drawn per replica on purpose")
    return Report(precision.name, steps, passed, verdict, differences, replica_spread=spread)


def _set_loss_scale(engines, value: float | None) -> None:
    if value is not None:
        for engine in engines:
            for optimizer in engine.optimizers.values():
                optimizer.dynamic_scale.assign(value)


def _loss_scales(engine) -> list[float]:
    return [float(o.dynamic_scale.numpy()) for o in engine.optimizers.values() if hasattr(o, "dynamic_scale")]


def twin_of(engine, assembly, batches: list, precision: Precision, k: int) -> Report:
    """`verify` as a Trainer asks for it: the distributed twin under a strategy; else compiled vs eager, with a
    float32 reference built by `assembly` (fastcore.engine.assembly) for bfloat16/float16."""
    if assembly.strategy is not None:   # the distributed twin: the same steps on one device
        single = assembly.twin(precision, engine.mode, engine.global_batch_size, apart_from=engine.models)
        return verify_distributed(engine, single, batches, precision, k > 1)
    reference = None
    if precision.name != "float32":
        if not assembly.factories:
            raise UsageError(f"verify in {precision.name} compares against a float32 reference built from the "
                             f"model's factory: pass the model as a factory")
        reference = assembly.twin(Precision("float32", "reference"), "eager", engine.global_batch_size,
                                  apart_from=engine.models)
    return verify(engine, batches, precision, k > 1, reference)
