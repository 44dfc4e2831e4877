#!/bin/bash
# A SLURM array job: 8 tasks share the models listed in models.txt (one folder a line); task I
# aligns every 8th model from the I-th and writes aligned/rotfuse_report.shard-I-of-8.json.
# Resubmitting the same array resumes: --skip-existing keeps every model already finished.
#SBATCH --job-name=rotfuse-match
#SBATCH --array=0-7
#SBATCH --cpus-per-task=4
#SBATCH --mem=16G
#SBATCH --output=logs/match-%A-%a.log
set -euo pipefail
rotfuse match anchor/ --models-from models.txt -o aligned/ \
    --shard "${SLURM_ARRAY_TASK_ID}/${SLURM_ARRAY_TASK_COUNT:-8}" --skip-existing --workers "${SLURM_CPUS_PER_TASK}"
