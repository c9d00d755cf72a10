#!/usr/bin/env bash
# System packages the project uses, installed with apt when it is available and they are
# missing: Debian's dataset-fashion-mnist (the embedded default's data) and, for the
# test suite's browser check of the MLflow UI, Debian's chromium. Never fails the build:
# without them the bench says where it looked for data and the browser test is skipped.
set -u
want=()
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || want+=(dataset-fashion-mnist)
if [ "${1:-}" = "--with-browser" ] && [ ! -x /usr/bin/chromium ]; then want+=(chromium); fi
[ ${#want[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
  echo "note: apt-get is not available; missing: ${want[*]} (pass --data-root to a Fashion-MNIST copy)" >&2
  exit 0
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo -n"
echo "installing Debian packages: ${want[*]} ..."
$sudo apt-get install -y -q "${want[@]}" >/dev/null 2>&1 \
  || { $sudo apt-get update -q >/dev/null 2>&1 && $sudo apt-get install -y -q "${want[@]}" >/dev/null 2>&1; } \
  || echo "note: could not install ${want[*]}" >&2
exit 0
