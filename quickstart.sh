#!/usr/bin/env bash
# Quick start: install, train a small Swin-T Mask R-CNN on the bundled SpaceNet sample, and run the main job.
set -euo pipefail
cd "$(dirname "$0")"
python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
python -m pip install --quiet -e ".[dev]"
python -m pipeline --help
