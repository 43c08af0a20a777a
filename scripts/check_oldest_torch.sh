#!/usr/bin/env bash
# Run the test suite under the oldest supported stack: torch 2.4 / torchvision 0.19 (Tecorigin ships torch 2.4
# and 2.7 on Python 3.10). Builds a throwaway virtual environment; needs PyPI (the torch 2.4 wheels, ~3 GB).
#
#   scripts/check_oldest_torch.sh [PYTHON] [VENV] [PYTEST ARGS…]
#   scripts/check_oldest_torch.sh python3.10 /tmp/venv-torch24 -x -q
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:-python3.10}
venv=${2:-/tmp/siamese-torch24}
shift $(( $# < 2 ? $# : 2 ))

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/pip" install -q "torch==2.4.1" "torchvision==0.19.1" "numpy<2"
"$venv/bin/pip" install -q -e ".[test]"
"$venv/bin/python" -c 'import sys, torch, torchvision; print("python", sys.version.split()[0], "torch", torch.__version__, "torchvision", torchvision.__version__)'
"$venv/bin/python" -m pytest "$@"
