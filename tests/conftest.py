"""Tests run on CPU with the machine's two cores; keep torch from oversubscribing them."""
import os

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))
