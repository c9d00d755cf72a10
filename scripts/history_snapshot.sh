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
# Methods that need a guide set run with one (--guide real:1), and so does one guided
# inversion (Fast with its discriminator on), in a second bench folder.
plain=$(PYTHONPATH=$code $py -c "from methods import get_method, list_methods; print(' '.join(m for m in list_methods() if not get_method(m).requires_guide))")
guided=$(PYTHONPATH=$code $py -c "from methods import get_method, list_methods; print(' '.join(m for m in list_methods() if get_method(m).requires_guide))")
common="--budget smoke --set epochs=3 --data-root $root/data --teacher-dir $root/teachers --device cpu"
distill() {
  OMP_NUM_THREADS=1 PYTHONPATH=$code $py -m orchestrator.distill --method "$1" --dataset mnist --teacher resnet8 \
    --student resnet8 $common --out "$out/distill" --no-progress --fresh "${@:2}" > "$out/distill_$(echo "$*" | tr ' :=' '___').log" 2>&1
}
for m in $plain; do distill "$m"; done
for m in $guided; do distill "$m" --guide real:1; done
distill fast --guide real:1 --set guide=0.5
PYTHONPATH=$code $py -m orchestrator.bench --methods "${plain// /,}" --datasets mnist --pairs resnet8:resnet8 \
  $common --out "$out/bench" > "$out/bench.log" 2>&1
PYTHONPATH=$code $py -m orchestrator.bench --methods "${guided// /,},fast" --set fast.guide=0.5 --guide real:1 \
  --datasets mnist --pairs resnet8:resnet8 $common --out "$out/bench_guide" > "$out/bench_guide.log" 2>&1
echo "histories in $out (exit $?)"
