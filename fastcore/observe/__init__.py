"""Observation: throughput meter, TensorBoard scalars and profile window, FLOPs, calibration, the doctor."""
