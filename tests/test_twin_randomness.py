"""The eager twin draws what the compiled step draws, and judges rounding by the model's own float32 spread:
correct models that draw random numbers pass the pre-flight and verify; a real XLA miscompile does not."""
import threading

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers, ops

import fastcore
import pipelines
from fastcore.engine import twin_random

SEED = tf.constant([3, 4], tf.int32)
DRAWS = {   # every draw measured to differ between TensorFlow's kernels and XLA's (fastcore.engine.twin_random)
    "stateless_normal": lambda: tf.random.stateless_normal((64, 32), SEED),
    "stateless_normal philox": lambda: tf.random.stateless_normal((64, 32), SEED, alg="philox"),
    "stateless_uniform": lambda: tf.random.stateless_uniform((64, 32), SEED, minval=-2.0, maxval=3.0),
    "stateless_truncated_normal": lambda: tf.random.stateless_truncated_normal((64, 32), SEED),
    "stateless_categorical": lambda: tf.cast(tf.random.stateless_categorical(tf.math.log([[0.2, 0.3, 0.5]] * 8),
                                                                             64, SEED), tf.float32),
    "stateless_dropout": lambda: tf.nn.experimental.stateless_dropout(tf.ones((64, 32)), 0.5, SEED),
    "image flip": lambda: tf.image.stateless_random_flip_left_right(tf.reshape(tf.range(96.0), (4, 4, 2, 3)), SEED),
}


@pytest.mark.parametrize("draw", list(DRAWS))
def test_eager_draws_inside_the_twin_are_xlas_bit_for_bit(draw):
    fn = DRAWS[draw]
    compiled = tf.function(fn, jit_compile=True)().numpy()
    assert not np.array_equal(fn().numpy(), compiled), "TensorFlow's kernel drew XLA's numbers: nothing to route"
    with twin_random.xla_draws():
        assert np.array_equal(fn().numpy(), compiled)
    assert not np.array_equal(fn().numpy(), compiled), "the routing outlived its scope"


def test_keras_random_with_a_seed_generator_draws_the_same_compiled_and_eager():
    generator = keras.random.SeedGenerator(1337)

    def draw():
        return tf.concat([keras.random.normal((8, 4), seed=generator), keras.random.uniform((8, 4), seed=generator),
                          keras.random.dropout(tf.ones((8, 4)), 0.5, seed=generator)], axis=0)
    start = generator.state.numpy()
    compiled = tf.function(draw, jit_compile=True)().numpy()
    generator.state.assign(start)
    with twin_random.xla_draws():
        eager = draw().numpy()
    assert np.array_equal(eager, compiled)
    assert generator.state.numpy()[1] == start[1] + 3


def test_the_routing_is_per_thread_and_is_taken_out_after_the_last_user():
    original = tf.random.stateless_normal
    entered, leave = threading.Event(), threading.Event()

    def other_thread():
        with twin_random.xla_draws():
            entered.set()
            leave.wait(30)
    worker = threading.Thread(target=other_thread)
    worker.start()
    entered.wait(30)
    try:
        assert tf.random.stateless_normal is not original   # routed while any thread is inside
        plain = original((16,), SEED).numpy()
        assert np.array_equal(tf.random.stateless_normal((16,), SEED).numpy(), plain)   # not this thread
    finally:
        leave.set()
        worker.join()
    assert tf.random.stateless_normal is original


def mnist(n):
    from conftest import shared_data_dir
    return pipelines.load("mnist", f"test[:{n}]", str(shared_data_dir())).x.reshape(-1, 28, 28, 1)


def batches(n=256, batch=32):
    return tf.data.Dataset.from_tensor_slices(mnist(n)).batch(batch, drop_remainder=True)


# --- The GAN of Keras' guide "Customizing what happens in fit()" (TensorFlow), its train_step as written,
# returning the gradients (fastcore applies them); models narrowed so the test runs in seconds.
LATENT = 16


def gan():
    disc = keras.Sequential([keras.Input((28, 28, 1)),
                             layers.Conv2D(8, 3, strides=2, padding="same"), layers.LeakyReLU(negative_slope=0.2),
                             layers.Conv2D(16, 3, strides=2, padding="same"), layers.LeakyReLU(negative_slope=0.2),
                             layers.GlobalMaxPooling2D(), layers.Dense(1)])
    gen = keras.Sequential([keras.Input((LATENT,)), layers.Dense(7 * 7 * 8), layers.LeakyReLU(negative_slope=0.2),
                            layers.Reshape((7, 7, 8)),
                            layers.Conv2DTranspose(8, 4, strides=2, padding="same"), layers.LeakyReLU(negative_slope=0.2),
                            layers.Conv2DTranspose(8, 4, strides=2, padding="same"), layers.LeakyReLU(negative_slope=0.2),
                            layers.Conv2D(1, 7, padding="same", activation="sigmoid")])
    return {"disc": disc, "gen": gen}


def guide_gan_step():
    seed_generator = keras.random.SeedGenerator(1337)   # in the step's closure: no model holds it
    loss_fn = keras.losses.BinaryCrossentropy(from_logits=True)

    def step(real_images, ctx):
        discriminator, generator = ctx.models["disc"], ctx.models["gen"]
        batch_size = tf.shape(real_images)[0]
        random_latent_vectors = keras.random.normal(shape=(batch_size, LATENT), seed=seed_generator)
        generated_images = generator(random_latent_vectors)
        combined_images = tf.concat([generated_images, real_images], axis=0)
        labels = tf.concat([tf.ones((batch_size, 1)), tf.zeros((batch_size, 1))], axis=0)
        labels += 0.05 * keras.random.uniform(tf.shape(labels), seed=seed_generator)
        with tf.GradientTape() as tape:
            predictions = discriminator(combined_images)
            d_loss = loss_fn(labels, predictions)
        d_grads = tape.gradient(d_loss, discriminator.trainable_weights)
        random_latent_vectors = keras.random.normal(shape=(batch_size, LATENT), seed=seed_generator)
        misleading_labels = tf.zeros((batch_size, 1))
        with tf.GradientTape() as tape:
            predictions = discriminator(generator(random_latent_vectors))
            g_loss = loss_fn(misleading_labels, predictions)
        g_grads = tape.gradient(g_loss, generator.trainable_weights)
        return fastcore.Update(loss={"d_loss": d_loss, "g_loss": g_loss},
                               gradients={"disc": zip(d_grads, discriminator.trainable_weights),
                                          "gen": zip(g_grads, generator.trainable_weights)})
    return step, seed_generator


def test_the_guides_gan_passes_the_pre_flight_and_verify():
    step, seed_generator = guide_gan_step()
    trainer = fastcore.Trainer(gan, {"disc": keras.optimizers.Adam(3e-4), "gen": keras.optimizers.Adam(3e-4)},
                               step=step, steps_per_call=1)
    report = trainer.verify(batches(), steps=4)
    assert report.passed, report.verdict
    before = seed_generator.state.numpy()
    trainer.fit(batches(), steps=1, verbose=False)
    assert trainer.preflight_report.passed, trainer.preflight_report.line()
    assert seed_generator.state.numpy()[1] == before[1] + 3, "the pre-flight left the closure's SeedGenerator moved"


# --- The Keras VAE example (keras.io/examples/generative/vae): its Sampling layer and train_step as written.
class Sampling(layers.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seed_generator = keras.random.SeedGenerator(1337)

    def call(self, inputs):
        z_mean, z_log_var = inputs
        batch = ops.shape(z_mean)[0]
        dim = ops.shape(z_mean)[1]
        epsilon = keras.random.normal(shape=(batch, dim), seed=self.seed_generator)
        return z_mean + ops.exp(0.5 * z_log_var) * epsilon


def vae():
    encoder_inputs = keras.Input(shape=(28, 28, 1))
    x = layers.Conv2D(8, 3, activation="relu", strides=2, padding="same")(encoder_inputs)
    x = layers.Conv2D(16, 3, activation="relu", strides=2, padding="same")(x)
    x = layers.Dense(16, activation="relu")(layers.Flatten()(x))
    z_mean, z_log_var = layers.Dense(2, name="z_mean")(x), layers.Dense(2, name="z_log_var")(x)
    encoder = keras.Model(encoder_inputs, [z_mean, z_log_var, Sampling()([z_mean, z_log_var])], name="encoder")
    latent_inputs = keras.Input(shape=(2,))
    x = layers.Reshape((7, 7, 16))(layers.Dense(7 * 7 * 16, activation="relu")(latent_inputs))
    x = layers.Conv2DTranspose(16, 3, activation="relu", strides=2, padding="same")(x)
    x = layers.Conv2DTranspose(8, 3, activation="relu", strides=2, padding="same")(x)
    decoder = keras.Model(latent_inputs, layers.Conv2DTranspose(1, 3, activation="sigmoid", padding="same")(x),
                          name="decoder")
    return {"encoder": encoder, "decoder": decoder}


def vae_step(data, ctx):
    encoder, decoder = ctx.models["encoder"], ctx.models["decoder"]
    with tf.GradientTape() as tape:
        z_mean, z_log_var, z = encoder(data)
        reconstruction = decoder(z)
        reconstruction_loss = ops.mean(ops.sum(keras.losses.binary_crossentropy(data, reconstruction), axis=(1, 2)))
        kl_loss = -0.5 * (1 + z_log_var - ops.square(z_mean) - ops.exp(z_log_var))
        kl_loss = ops.mean(ops.sum(kl_loss, axis=1))
        total_loss = reconstruction_loss + kl_loss
    weights = encoder.trainable_weights + decoder.trainable_weights
    grads = tape.gradient(total_loss, weights)
    return fastcore.Update(loss={"loss": total_loss, "reconstruction_loss": reconstruction_loss, "kl_loss": kl_loss},
                           gradients=zip(grads, weights))


def test_the_vae_examples_sampling_layer_passes_the_pre_flight_and_verify():
    trainer = fastcore.Trainer(vae, keras.optimizers.Adam(), step=vae_step, steps_per_call=1)
    report = trainer.verify(batches(), steps=4)
    assert report.passed, report.verdict
    trainer.fit(batches(), steps=1, verbose=False)
    assert trainer.preflight_report.passed, trainer.preflight_report.line()


@pytest.mark.parametrize("layer", [lambda: layers.Dropout(0.5, seed=1), lambda: layers.GaussianNoise(0.3, seed=1)])
def test_keras_random_layers_pass_verify_in_training(layer):
    x = np.random.default_rng(0).normal(size=(512, 4)).astype(np.float32)
    y = (x @ np.array([[1.0], [-2.0], [0.5], [3.0]], np.float32)).astype(np.float32)
    make = lambda: keras.Sequential([keras.Input((4,)), layers.Dense(32, activation="relu"), layer(), layers.Dense(1)])
    trainer = fastcore.Trainer(make, keras.optimizers.Adam(1e-2), loss=keras.losses.MeanSquaredError())
    report = trainer.verify(x, y, batch_size=32, steps=16)
    assert report.passed, report.verdict


class TracedBlock(keras.Model):
    """A real XLA miscompile (TF 2.21, open): a Keras model whose `call` is a tf.function computes whole units
    wrong inside jit_compile=True, with no error; eager and plain graphs agree."""

    def __init__(self):
        super().__init__()
        self.dense = layers.Dense(16, activation="tanh")

    @tf.function
    def call(self, x):
        return self.dense(x)


def test_a_real_xla_miscompile_is_still_refused_by_the_pre_flight_and_verify():
    x = np.random.default_rng(0).normal(size=(512, 4)).astype(np.float32)
    y = (x @ np.array([[1.0], [-2.0], [0.5], [3.0]], np.float32)).astype(np.float32)
    make = lambda: keras.Sequential([keras.Input((4,)), TracedBlock(), layers.Dense(1)])
    loss = keras.losses.MeanSquaredError()
    with pytest.raises(fastcore.PreflightError) as refused:
        fastcore.Trainer(make, keras.optimizers.Adam(1e-2), loss=loss).fit(x, y, batch_size=32, epochs=1, verbose=False)
    judgement = refused.value.report.judgement
    assert max(judgement.ratio(n) for n in judgement.failing) > 1e4   # measured 2.4e6: far beyond any spread
    report = fastcore.Trainer(make, keras.optimizers.Adam(1e-2), loss=loss, preflight=False).verify(
        x, y, batch_size=32, steps=16)
    assert not report.passed and "own float32 spread" in report.verdict


def test_a_gradient_that_is_all_rounding_noise_passes_within_the_models_own_spread():
    """A conv bias just before BatchNormalization has no true gradient: Adam moves it by rounding alone, so
    compiled and eager differ by 100% of it. The tight rule refuses that; the model's own spread (eager runs
    from nudged starts) shows float32 does the same by itself."""
    x = mnist(512)[:, ::2, ::2]
    y = np.arange(len(x)) % 10
    make = lambda: keras.Sequential([keras.Input((14, 14, 1)), layers.Conv2D(8, 3), layers.BatchNormalization(),
                                     layers.ReLU(), layers.MaxPooling2D(2), layers.Flatten(), layers.Dense(10)])
    trainer = fastcore.Trainer(make, keras.optimizers.Adam(1e-3),
                               loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    report = trainer.verify(x, y, batch_size=32, steps=16)
    assert report.passed, report.verdict
    noise = [d for d in report.compiled_vs_eager if d.max_rel > 1e-4]
    assert noise and all(d.spread is not None and d.max_abs <= 4 * d.spread for d in noise)
    assert "own float32 spread" in report.verdict
