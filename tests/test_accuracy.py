"""The tutorial results, trained for real on the real data with XLA-compiled steps."""
from fastcore.cli import plan as run
from bench import keras_baseline as baseline
from helpers import train


def test_line_recovers_w_and_b(data_dir):
    _, step = train("line", data_dir, model_api="module")
    w, b = float(step.model.kernels[0].numpy()[0, 0]), float(step.model.biases[0].numpy()[0])
    assert abs(w - 3) <= 0.05 and abs(b - 2) <= 0.05, (w, b)


def test_sine_reaches_mse_1e_3(data_dir):
    summary, _ = train("sine", data_dir)
    assert summary["eval"]["mse"] <= 1e-3


def test_fashion_mnist_five_epochs(data_dir):
    summary, _ = train("fashion_mnist", data_dir, epochs=5)
    assert summary["eval"]["accuracy"] >= 0.85


def test_mnist_on_the_real_test_file_split_8000_2000(data_dir):
    summary, _ = train("mnist", data_dir, model_api="module", train_split="test[:8000]", eval_split="test[8000:]")
    assert summary["eval"]["accuracy"] >= 0.94


def test_higgs_matches_keras_fit(data_dir):
    flags = dict(data_dir=data_dir, train_split="train[:10000]", eval_split="train[10000:]", l2=1e-3, epochs=20,
                 precision="float32")
    summary, _ = train("higgs", **flags)
    ours = summary["eval"]["binary_accuracy"]
    keras_fit = baseline.keras_fit(run.plan(run.RunConfig("higgs", **flags)))["eval"]["binary_accuracy"]
    assert ours >= 0.62
    assert abs(ours - keras_fit) <= 0.02, (ours, keras_fit)
