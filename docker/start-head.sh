#!/usr/bin/env bash
# Start a Ray head node in the foreground. The head also runs model actors when it has a GPU.
set -euo pipefail
exec ray start --head --port=6379 --dashboard-host=0.0.0.0 \
    --num-gpus="${NUM_GPUS:-$(nvidia-smi -L 2>/dev/null | wc -l)}" --block
