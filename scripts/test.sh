#!/usr/bin/env bash
# The test command of README.md: bring up PostgreSQL and Redis, then run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/services.sh
exec python -m pytest -q -p no:cacheprovider "$@"
