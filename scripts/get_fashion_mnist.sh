#!/usr/bin/env bash
# Make Fashion-MNIST's original idx files available, in this order:
#   1. already installed (Debian's dataset-fashion-mnist, or $FASHION_MNIST_ROOT);
#   2. apt-get install dataset-fashion-mnist (only as root: this script never asks for sudo);
#   3. torchvision's download into ./data (needs internet).
set -euo pipefail
cd "$(dirname "$0")/.."
DEBIAN_ROOT=/usr/share/datasets/fashion-mnist
ROOT=${FASHION_MNIST_ROOT:-$DEBIAN_ROOT}
have() { [ -f "$1/train-images-idx3-ubyte.gz" ] || [ -f "$1/train-images-idx3-ubyte" ]; }

if have "$ROOT"; then
  exit 0
fi
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "Installing Debian's dataset-fashion-mnist ..."
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null; } \
    || true
  have "$DEBIAN_ROOT" && exit 0
fi
echo "Trying torchvision's download into ./data ..."
if .venv/bin/python -c "from torchvision.datasets import FashionMNIST; FashionMNIST('data', download=True)" \
   >/dev/null 2>&1 && have data/FashionMNIST/raw; then
  echo "Fashion-MNIST is in data/FashionMNIST/raw: run the sweep with" \
       "--set datasets.fashion_mnist.root=data/FashionMNIST/raw"
  exit 0
fi
cat >&2 <<MSG
error: Fashion-MNIST is not available and could not be installed.
  Expected its idx files (train-images-idx3-ubyte.gz, ...) under $ROOT.
  Install Debian's package (as root):  apt-get install dataset-fashion-mnist
  or put the four files in a folder and set FASHION_MNIST_ROOT=/that/folder and
  --set datasets.fashion_mnist.root=/that/folder when running jobs/sweep.py.
MSG
exit 1
