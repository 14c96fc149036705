#!/usr/bin/env bash
# Install what the tests need, then run every test this machine can run: unit, agent
# (simulated control channel), integration (SSH servers on loopback) and end-to-end
# (real kernels in lab guests, booted by the tests themselves).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
.venv/bin/ruff check .
.venv/bin/mypy
# pyproject's addopts leave e2e out of a plain `pytest`; select every tier here
exec .venv/bin/python -m pytest -ra -m "e2e or not e2e" "$@"
