#!/usr/bin/env bash
# Install everything, boot one lab guest, and run the seed's hello world on it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
.venv/bin/stapctl lab up
.venv/bin/stapctl apply playbooks/hello.yaml
