#!/usr/bin/env bash
# Fixed-seed histories of every method, in one process (distill) and on Ray (bench), for the
# "same seed, same history" check of a change that should not change results:
#     bash scripts/history_snapshot.sh <code tree> <out>        # e.g. a worktree of the old commit
#     python scripts/compare_histories.py <out of old> <out of new>
# Tiny MNIST-format data and a resnet8 teacher (made once under $ROOT), smoke budget, 3 epochs.
set -u
if [ $# -ne 2 ] || [ ! -d "$1/methods" ]; then
  echo "usage: bash scripts/history_snapshot.sh <code tree> <out>  (a checkout of this project, an output folder)" >&2
  exit 2
fi
code=$(cd "$1" && pwd); out=$2; root=${ROOT:-/tmp/dfkd_history_env}
py=${PYTHON:-$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python}
mkdir -p "$out"; out=$(cd "$out" && pwd)
cd "$code"
if [ ! -f "$root/teachers/mnist-resnet8.pt" ]; then
PYTHONPATH=$code $py - "$root" <<'PY'
import sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from tests.test_datasets import make_mnist_like
from orchestrator.core.classifiers import default_recipe, get_classifier
root = Path(sys.argv[1]); make_mnist_like(root / "data" / "mnist", n=64)
get_classifier("mnist", "resnet8", out=root / "teachers", recipe=default_recipe("mnist", epochs=1, batch_size=32),
               data_root=root / "data", progress=False, log=lambda *_: None)
PY
fi
methods=$(PYTHONPATH=$code $py -c "from methods import list_methods; print(' '.join(list_methods()))")
common="--budget smoke --set epochs=3 --data-root $root/data --teacher-dir $root/teachers --device cpu"
for m in $methods; do
  OMP_NUM_THREADS=1 PYTHONPATH=$code $py -m orchestrator.distill --method "$m" --dataset mnist --teacher resnet8 \
    --student resnet8 $common --out "$out/distill" --no-progress --fresh > "$out/distill_$m.log" 2>&1
done
PYTHONPATH=$code $py -m orchestrator.bench --methods "${methods// /,}" --datasets mnist --pairs resnet8:resnet8 \
  $common --out "$out/bench" > "$out/bench.log" 2>&1
echo "histories in $out (exit $?)"
