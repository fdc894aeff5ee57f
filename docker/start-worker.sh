#!/usr/bin/env bash
# Join a Ray cluster as a GPU worker: RAY_HEAD=host:6379 must be set.
set -euo pipefail
: "${RAY_HEAD:?set RAY_HEAD=head-host:6379}"
exec ray start --address="$RAY_HEAD" \
    --num-gpus="${NUM_GPUS:-$(nvidia-smi -L 2>/dev/null | wc -l)}" --block
