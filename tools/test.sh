#!/usr/bin/env bash
# Set up (idempotent) and run the test suite; arguments go to pytest.
# Everything runs by default (as CI does); for a quicker local pass skip the crash-and-resume
# matrices with:  tools/test.sh -m "not slow"
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
exec "${PYTHON:-python3}" -m pytest -q tests "$@"
