"""The engine: the compiled step and its eager twin, feeding, the loop, checkpoints, verify and pre-flight, precision."""
