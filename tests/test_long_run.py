"""A long run stays flat: resident memory does not grow across epochs, and nothing retraces."""
import os

from fastcore import Callback
from fastcore.cli import plan as run


def resident_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class MemoryPerEpoch(Callback):
    def __init__(self):
        self.samples = []

    def on_epoch_end(self, loop, logs):
        self.samples.append(resident_mb())


def test_memory_is_flat_across_epochs_and_there_is_one_trace(data_dir, tmp_path):
    p = run.plan(run.RunConfig("higgs", data_dir=data_dir, train_split="train[:2000]", eval_split="train[2000:3000]",
                               epochs=60, dropout=0.2, logdir=str(tmp_path), precision="float32"))
    memory = MemoryPerEpoch()
    p.trainer.fit(p.feed, steps=p.total_steps, validation_data=p.eval, callbacks=[memory], verbose=False)
    step = p.trainer.engine
    assert len(memory.samples) == 60
    settled = memory.samples[9]   # after warm-up: compile, allocator pools, first evaluation
    growth = max(memory.samples[10:]) - settled
    assert growth < 8, f"resident memory grew {growth:.1f} MB over 50 epochs: {memory.samples[9::10]}"
    assert step.ledger.counts() == {"train": 1, "eval": 1}
