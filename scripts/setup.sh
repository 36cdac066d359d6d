#!/usr/bin/env bash
# Installs placer for development, pinned to the CPU torch build (see constraints.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -c constraints.txt -e ".[dev]"
