"""Datasets, benchmark suites, published reference numbers and performance benchmarks.

Plain PyTorch/numpy: never imports ray or mlflow."""
