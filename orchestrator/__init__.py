"""Everything that runs experiments: the training and distillation loops, the Ray actors,
the CLIs (teachers, distill, bench, tune), MLflow tracking and reports."""
