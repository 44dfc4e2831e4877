#!/bin/bash
# Four processes on one node, one share of the models each (torchrun sets RANK and WORLD_SIZE for
# every process it starts): the same as four array tasks. Each process logs timestamped lines
# (stderr is not a terminal) and writes aligned/rotfuse_report.shard-RANK-of-4.json.
set -euo pipefail
torchrun --standalone --nproc-per-node 4 --no-python sh -c \
    'rotfuse match --config configs/examples/match.yaml --shard "$RANK/$WORLD_SIZE" --skip-existing --workers 1'
