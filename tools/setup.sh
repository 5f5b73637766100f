#!/usr/bin/env bash
# Install streamresize and its dependencies on a new machine. torch goes first and pinned, so that
# pip does not pull a multi-GB CUDA build for a bare `torch` requirement.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip install -q --disable-pip-version-check "torch==${TORCH_VERSION:-2.13.0}"
"$PY" -m pip install -q --disable-pip-version-check -e ".[test,demo,plots]"
