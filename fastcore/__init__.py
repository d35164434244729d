"""fastcore: XLA-compiled training steps with eager reference twins, fed by streaming tf.data."""
