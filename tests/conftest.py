"""Tests run on CPU with the machine's two cores; keep torch from oversubscribing them."""
import os

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import torch  # noqa: E402

# Tests use tiny models and batches, where a second thread costs more than it gives
# (and CLIs started by the tests run in their own processes with their own threads).
torch.set_num_threads(1)
