"""Warm-start and calibration: per-batch steps, local and Ray Train + DeepSpeed drivers, publishing."""
