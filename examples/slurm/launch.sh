#!/bin/bash
# One training job step under SLURM, started by train_1node.sbatch / train_2nodes.sbatch (not by hand).
#
# srun starts one task per GPU and each task is one rank (RANK, LOCAL_RANK, WORLD_SIZE from SLURM's variables;
# Accelerate reads them like torchrun's), so SLURM's --signal reaches every rank itself: each finishes its
# iteration, the ranks agree on the stop, a checkpoint is written and every rank exits 138 (SIGUSR1) or 143
# (SIGTERM, e.g. scancel or preemption). Then the job requeues itself and the next start resumes with
# --init_from resume. (torchrun in between would die of SIGUSR1, which its agent does not handle by default.)
#
# Settings (environment): CONFIG (a YAML config), OUT_DIR (on a file system all nodes share), EXTRA_ARGS (more
# train.py flags; default --checkpoint_minutes 30: a crash without a signal loses at most 30 minutes).
set -uo pipefail

CONFIG=${CONFIG:-examples/configs/train_gpt2.yaml}
OUT_DIR=${OUT_DIR:-out-gpt2}
EXIT_SIGUSR1=138  # examples/train.py's exit codes: 128 + the signal (nanogpt_hf.guards.EXIT_CODES)
EXIT_SIGTERM=143

MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export MASTER_ADDR MASTER_PORT

# a checkpoint in out_dir (this job ran before and was stopped or requeued): continue from it
INIT_FROM=scratch
if compgen -G "$OUT_DIR/checkpoints/step_*/manifest.json" > /dev/null; then
    INIT_FROM=resume
fi
echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NUM_NODES node(s): --init_from $INIT_FROM"

# shellcheck disable=SC2016  # the $SLURM_* variables are each task's own, expanded inside the task
srun --kill-on-bad-exit=0 bash -c \
    'RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS exec python examples/train.py "$@"' \
    _ "$CONFIG" --out_dir "$OUT_DIR" --init_from "$INIT_FROM" ${EXTRA_ARGS---checkpoint_minutes 30}
code=$?

if [ "$code" -eq "$EXIT_SIGUSR1" ] || [ "$code" -eq "$EXIT_SIGTERM" ]; then
    echo "stopped by a signal with a checkpoint in $OUT_DIR (exit $code): requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$code"
