"""The GAN of the Keras guide "Customizing what happens in fit()", its train_step moved into fastcore steps.

Shows: the guide's code as it writes it: its discriminator and generator, its latent vectors from
`keras.random.normal(shape, seed=self.seed_generator)`, its label noise from `keras.random.uniform`, both
drawn from one `keras.random.SeedGenerator(1337)`, its loss and optimizers. Only the two
`optimizer.apply(...)` calls change: each becomes the end of a step phase that returns its gradients in a
`fastcore.Update`, and `step=[discriminator_step, generator_step]` applies them in the guide's order (the
generator trains against the discriminator just updated). The compiled step draws its random numbers
under XLA; the pre-flight check and `trainer.verify` compare it with the same Python run eagerly.
The guide's own `GAN(keras.Model)` with its `train_step`, compiled and fitted as the guide does, is the
yardstick on the same data.
Data: the real MNIST digits (the test split: the only MNIST images here), [28, 28, 1] in [0, 1] as the
guide prepares them, shuffled and batched as the guide does (batches of 32, not 64: see WIDTH), 2 epochs
of 100 batches.
Target: pre-flight and verify pass; for fastcore and Keras alike, the last epoch's mean d_loss within
D_LOSS_RANGE and g_loss within G_LOSS_RANGE: finite, a discriminator that tells real from fake better
than chance (d_loss log 2 = 0.693 at chance, whatever the label noise) without beating the generator
outright (d_loss near 0, or below it with the guide's noisy labels above 1; g_loss then grows past 3).
"""
import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import tensorflow as tf
from keras import layers

import fastcore
import pipelines

LATENT_DIM = 128
# The guide's convolutions have 64 and 128 channels; a quarter of each here. Measured on 2 busy cores,
# one step of the guide's widths at its batch of 64 takes 1.2 s under XLA (0.65 s as a graph); a quarter
# width at batch 32, 0.09 s.
WIDTH = 32
BATCH, EPOCHS, STEPS_PER_EPOCH, VERIFY_STEPS, SEED = 32, 2, 100, 3, 0
# Measured here (seed 0, 2 epochs of 100 steps): d_loss 0.553 fastcore, 0.560 Keras; g_loss 0.842, 0.815.
D_LOSS_RANGE, G_LOSS_RANGE = (0.2, 0.68), (0.5, 3.0)
DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def make_discriminator() -> keras.Model:
    """The guide's discriminator: 28x28 digits to one logit, "real" or "fake"."""
    return keras.Sequential([
        keras.Input(shape=(28, 28, 1)),
        layers.Conv2D(WIDTH // 2, (3, 3), strides=(2, 2), padding="same"),
        layers.LeakyReLU(negative_slope=0.2),
        layers.Conv2D(WIDTH, (3, 3), strides=(2, 2), padding="same"),
        layers.LeakyReLU(negative_slope=0.2),
        layers.GlobalMaxPooling2D(),
        layers.Dense(1),
    ], name="discriminator")


def make_generator() -> keras.Model:
    """The guide's generator: a latent vector to a 28x28 image."""
    return keras.Sequential([
        keras.Input(shape=(LATENT_DIM,)),
        layers.Dense(7 * 7 * WIDTH),
        layers.LeakyReLU(negative_slope=0.2),
        layers.Reshape((7, 7, WIDTH)),
        layers.Conv2DTranspose(WIDTH, (4, 4), strides=(2, 2), padding="same"),
        layers.LeakyReLU(negative_slope=0.2),
        layers.Conv2DTranspose(WIDTH, (4, 4), strides=(2, 2), padding="same"),
        layers.LeakyReLU(negative_slope=0.2),
        layers.Conv2D(1, (7, 7), padding="same", activation="sigmoid"),
    ], name="generator")


class GANSteps:
    """The guide's GAN.train_step as two fastcore step phases, split where the guide applies gradients.

    The guide calls `self.d_optimizer.apply(...)` and `self.g_optimizer.apply(...)` inside train_step.
    fastcore refuses a step that applies gradients itself (UsageError): it applies what the step returns,
    after checking every loss and gradient for NaN/Inf, so a bad step changes no weight, and it scales
    float16 losses and counts steps. So each phase returns its gradients instead, and
    `step=[steps.discriminator_step, steps.generator_step]` applies the discriminator's update before the
    generator's phase runs, as the guide's two `apply` calls do. (One step returning
    `gradients={"discriminator": ..., "generator": ...}` would take both from the same weights: the
    generator would train against the discriminator before its update, which is not the guide's GAN.)
    """

    def __init__(self, latent_dim: int):
        self.latent_dim = latent_dim
        # No model holds it (the guide's GAN model did): verify and the pre-flight save and restore it
        # with the models all the same, as a variable the traced step touches.
        self.seed_generator = keras.random.SeedGenerator(1337)
        self.loss_fn = keras.losses.BinaryCrossentropy(from_logits=True)

    def discriminator_step(self, real_images, ctx):
        discriminator, generator = ctx.models["discriminator"], ctx.models["generator"]
        # Sample random points in the latent space
        batch_size = tf.shape(real_images)[0]
        random_latent_vectors = keras.random.normal(
            shape=(batch_size, self.latent_dim), seed=self.seed_generator
        )
        # Decode them to fake images
        generated_images = generator(random_latent_vectors)
        # Combine them with real images
        combined_images = tf.concat([generated_images, real_images], axis=0)
        # Assemble labels discriminating real from fake images
        labels = tf.concat([tf.ones((batch_size, 1)), tf.zeros((batch_size, 1))], axis=0)
        # Add random noise to the labels - important trick!
        labels += 0.05 * keras.random.uniform(tf.shape(labels), seed=self.seed_generator)
        # Train the discriminator
        with tf.GradientTape() as tape:
            predictions = discriminator(combined_images)
            d_loss = self.loss_fn(labels, predictions)
        grads = tape.gradient(d_loss, discriminator.trainable_weights)
        return fastcore.Update(loss={"d_loss": d_loss},
                               gradients={"discriminator": zip(grads, discriminator.trainable_weights)})

    def generator_step(self, real_images, ctx):
        discriminator, generator = ctx.models["discriminator"], ctx.models["generator"]
        batch_size = tf.shape(real_images)[0]
        # Sample random points in the latent space
        random_latent_vectors = keras.random.normal(
            shape=(batch_size, self.latent_dim), seed=self.seed_generator
        )
        # Assemble labels that say "all real images"
        misleading_labels = tf.zeros((batch_size, 1))
        # Train the generator (note that we should *not* update the weights of the discriminator)!
        with tf.GradientTape() as tape:
            predictions = discriminator(generator(random_latent_vectors))
            g_loss = self.loss_fn(misleading_labels, predictions)
        grads = tape.gradient(g_loss, generator.trainable_weights)
        return fastcore.Update(loss={"g_loss": g_loss},
                               gradients={"generator": zip(grads, generator.trainable_weights)})


class GAN(keras.Model):
    """The guide's GAN, as it writes it: the yardstick."""

    def __init__(self, discriminator, generator, latent_dim):
        super().__init__()
        self.discriminator = discriminator
        self.generator = generator
        self.latent_dim = latent_dim
        self.d_loss_tracker = keras.metrics.Mean(name="d_loss")
        self.g_loss_tracker = keras.metrics.Mean(name="g_loss")
        self.seed_generator = keras.random.SeedGenerator(1337)

    @property
    def metrics(self):
        return [self.d_loss_tracker, self.g_loss_tracker]

    def compile(self, d_optimizer, g_optimizer, loss_fn):
        super().compile()
        self.d_optimizer = d_optimizer
        self.g_optimizer = g_optimizer
        self.loss_fn = loss_fn

    def train_step(self, real_images):
        if isinstance(real_images, tuple):
            real_images = real_images[0]
        batch_size = tf.shape(real_images)[0]
        random_latent_vectors = keras.random.normal(shape=(batch_size, self.latent_dim), seed=self.seed_generator)
        generated_images = self.generator(random_latent_vectors)
        combined_images = tf.concat([generated_images, real_images], axis=0)
        labels = tf.concat([tf.ones((batch_size, 1)), tf.zeros((batch_size, 1))], axis=0)
        labels += 0.05 * keras.random.uniform(tf.shape(labels), seed=self.seed_generator)
        with tf.GradientTape() as tape:
            predictions = self.discriminator(combined_images)
            d_loss = self.loss_fn(labels, predictions)
        grads = tape.gradient(d_loss, self.discriminator.trainable_weights)
        self.d_optimizer.apply(grads, self.discriminator.trainable_weights)

        random_latent_vectors = keras.random.normal(shape=(batch_size, self.latent_dim), seed=self.seed_generator)
        misleading_labels = tf.zeros((batch_size, 1))
        with tf.GradientTape() as tape:
            predictions = self.discriminator(self.generator(random_latent_vectors))
            g_loss = self.loss_fn(misleading_labels, predictions)
        grads = tape.gradient(g_loss, self.generator.trainable_weights)
        self.g_optimizer.apply(grads, self.generator.trainable_weights)

        self.d_loss_tracker.update_state(d_loss)
        self.g_loss_tracker.update_state(g_loss)
        return {"d_loss": self.d_loss_tracker.result(), "g_loss": self.g_loss_tracker.result()}


def digits(data_dir: str) -> tf.data.Dataset:
    """The guide's dataset: digits as [28, 28, 1] floats in [0, 1], shuffled, batched."""
    all_digits = pipelines.load("mnist", f"test[:{BATCH * STEPS_PER_EPOCH}]", data_dir).x.reshape(-1, 28, 28, 1)
    dataset = tf.data.Dataset.from_tensor_slices(all_digits)
    return dataset.shuffle(buffer_size=1024, seed=SEED).batch(BATCH, drop_remainder=True)


def in_range(losses: dict) -> bool:
    return (D_LOSS_RANGE[0] <= losses["d_loss"] <= D_LOSS_RANGE[1]
            and G_LOSS_RANGE[0] <= losses["g_loss"] <= G_LOSS_RANGE[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("FASTCORE_DATA_DIR") or str(DEFAULT_DATA))
    args = parser.parse_args()
    dataset = digits(args.data_dir)

    steps = GANSteps(LATENT_DIM)
    trainer = fastcore.Trainer(
        {"discriminator": make_discriminator, "generator": make_generator},
        {"discriminator": keras.optimizers.Adam(learning_rate=0.0003),
         "generator": keras.optimizers.Adam(learning_rate=0.0003)},
        # steps_per_call=1: XLA on a CPU runs these convolutions far slower inside a K-step loop
        # (measured, 2 busy cores: 441 examples/s at K=1, 34 at K=10; the default here would be K=50).
        step=[steps.discriminator_step, steps.generator_step], seed=SEED, steps_per_call=1)
    report = trainer.verify(dataset, steps=VERIFY_STEPS)   # the eager twin; changes no weight
    print(f"verify ({VERIFY_STEPS} steps): {report.verdict}")
    result = trainer.fit(dataset, epochs=EPOCHS)
    ours = {name: result.history[-1][f"train_{name}"] for name in ("d_loss", "g_loss")}

    keras.utils.set_random_seed(SEED)
    gan = GAN(discriminator=make_discriminator(), generator=make_generator(), latent_dim=LATENT_DIM)
    gan.compile(d_optimizer=keras.optimizers.Adam(learning_rate=0.0003),
                g_optimizer=keras.optimizers.Adam(learning_rate=0.0003),
                loss_fn=keras.losses.BinaryCrossentropy(from_logits=True))
    logs = gan.fit(dataset, epochs=EPOCHS, verbose=0).history
    theirs = {name: logs[name][-1] for name in ("d_loss", "g_loss")}

    line = (f"last epoch's mean d_loss: fastcore {ours['d_loss']:.3f}  keras fit {theirs['d_loss']:.3f}; "
            f"g_loss: fastcore {ours['g_loss']:.3f}  keras fit {theirs['g_loss']:.3f} "
            f"(target: d_loss in {list(D_LOSS_RANGE)}, g_loss in {list(G_LOSS_RANGE)} for both; verify passes)")
    if not (report.passed and in_range(ours) and in_range(theirs)):
        print(f"FAILED: {line}")
        return 1
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
