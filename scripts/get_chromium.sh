#!/usr/bin/env bash
# Make Debian's chromium available for the MLflow UI browser test (driven by PyPI's playwright;
# `playwright install` downloads a browser and is never used here): already installed, or
# apt-get install chromium as root (never with sudo). Exit status 1 when it cannot be installed.
set -euo pipefail
CHROMIUM=/usr/bin/chromium

if [ -x "$CHROMIUM" ]; then
  exit 0
fi
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "Installing Debian's chromium (for the MLflow UI test) ..."
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q chromium >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; } \
    || true
  [ -x "$CHROMIUM" ] && exit 0
fi
echo "warning: $CHROMIUM is not installed and could not be (apt-get install chromium, as root);" \
     "the MLflow UI browser test cannot run" >&2
exit 1
