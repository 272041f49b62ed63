#!/usr/bin/env bash
# Everything a developer lent a GPU runs, as one command, within 8 minutes on one H100/H200:
#   1. the compiled Triton kernels against their PyTorch references (benchmarks/gpu_kernel_check.py)
#   2. the kernel benchmarks (benchmarks/bench_kernels.py)
#   3. one pretraining step of the base model in bf16, with MFU (benchmarks/bench_pretrain.py --model base)
#   4. the MAE step of the large model in bf16 without and with activation checkpointing: step time, MFU, peak
#      memory (bench_pretrain.py --model large --activation-checkpointing both; batch 128 of 64x64 tiles: ~11 TFLOP
#      and, by the saved-tensor count on CPU, at most ~12 GB of activations per step, ~6 GB of weights + AdamW)
#   5. the probe (hsfm probe) on Indian Pines with a random-init backbone, on the GPU
#   6. unmixing (GPU only): one run of every hsfm unmix method on Samson at a tenth of its epochs, and the Mamba
#      model's step time and memory as the scene grows up to Urban's size (benchmarks/bench_unmix.py)
# Steps 3 and 4 also print which SDPA backends (flash, memory-efficient, cuDNN, math) the models' attention uses.
# Figures land in OUT (default benchmarks/gpu_out, or $OUT on the device tool's machine) as JSON and logs, to be
# copied into docs/benchmarks.md with the device name (device.txt).
#
# Without a GPU (CI, a laptop) the same script runs the CPU-safe parts in their quick forms, so it cannot rot
# (step 4 on the tiny model: the large one is far too slow on a CPU). HSFM_SUITE_SMOKE=1 (what the test suite
# sets) shrinks those further: one warm-up and one timed step per case, batch 1, fewer bands and tiles, one probe
# seed; every step and every output file stays, the figures are not worth reading.
#
# On the device tool's machine: its python3 holds torch and triton but not every dependency. Before the call,
# here: `bash benchmarks/gpu_wheels.sh` (wheels for the missing pure-Python packages into .whl/, git-ignored) and
# copy the Indian Pines and Samson scenes into .gpu_data/ (`mkdir -p .gpu_data && cp ../shared/data/classification/
# indian_pines/indian_pines.npz ../shared/data/unmixing/samson/samson.npz .gpu_data/`); then run with carry
# [".whl", ".gpu_data"]:
#   bash benchmarks/gpu_suite.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-benchmarks/gpu_out}}"
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
PYTHON="${PYTHON:-python3}"
status=0

step() {  # step NAME TIMEOUT_S COMMAND...: run, log to OUT_DIR/NAME.log, remember a failure, go on
  local name="$1" limit="$2"; shift 2
  echo "== $name (limit ${limit}s): $*"
  local started=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$OUT_DIR/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - started)) s"
  [ "$rc" -eq 0 ] || status=1
}

# The package must import as hsfm_train (with kernels/ as hsfm_train.kernels), from this checkout.
if ! "$PYTHON" -c "import hsfm_train.kernels, hydra, omegaconf" 2>/dev/null; then
  if [ -d .whl ]; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/hsfm-site .whl/*.whl
    export PYTHONPATH="/tmp/hsfm-site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation -e . || status=1
fi

GPU=$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else '')")
{
  echo "device: ${GPU:-none (CPU-safe parts only)}"
  "$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" 2>&1
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  date -u +"%Y-%m-%dT%H:%M:%SZ"
} | tee "$OUT_DIR/device.txt"

SCENE="${HSFM_PROBE_SCENE:-}"
for candidate in .gpu_data/indian_pines.npz ../shared/data/classification/indian_pines/indian_pines.npz; do
  [ -z "$SCENE" ] && [ -f "$candidate" ] && SCENE="$candidate"
done

if [ -n "$GPU" ]; then
  step kernel_check 120 "$PYTHON" benchmarks/gpu_kernel_check.py --json "$OUT_DIR/kernel_check.json"
  step bench_kernels 150 "$PYTHON" benchmarks/bench_kernels.py --json "$OUT_DIR/bench_kernels.json"
  step bench_pretrain_base 150 "$PYTHON" benchmarks/bench_pretrain.py --model base --batch 64 --tile 64 \
    --json "$OUT_DIR/bench_pretrain_base.json"
  step bench_pretrain_large 120 "$PYTHON" benchmarks/bench_pretrain.py --model large --batch 128 --tile 64 \
    --sections objective --objectives mae --activation-checkpointing both --json "$OUT_DIR/bench_pretrain_large.json"
  PROBE_ARGS=(shots=[5,10] seeds=5)
  SAMSON=""
  for candidate in .gpu_data/samson.npz ../shared/data/unmixing/samson/samson.npz; do
    [ -z "$SAMSON" ] && [ -f "$candidate" ] && SAMSON="$candidate"
  done
  if [ -n "$SAMSON" ]; then
    step bench_unmix 150 "$PYTHON" benchmarks/bench_unmix.py --scene "$SAMSON" --sections methods,mamba-scaling \
      --methods vca-fcls,nfindr-fcls,nmf,labelled-als,cnnaeu,cnnaeu-contrastive,mamba-semi --epochs-scale 0.1 \
      --sizes 64,128,256,320 --steps 3 --json "$OUT_DIR/bench_unmix.json"
  else
    echo "== bench_unmix: skipped (no Samson scene: copy it into .gpu_data/)"
  fi
else
  KERNEL_ARGS=() PRETRAIN_ARGS=() CKPT_ARGS=() PROBE_ARGS=(shots=[5] seeds=2 probes=[linear])
  if [ "${HSFM_SUITE_SMOKE:-0}" = 1 ]; then
    KERNEL_ARGS=(--repeats 1)
    CKPT_ARGS=(--repeats 1 --warmup 1 --batch 1 --bands 64)
    PRETRAIN_ARGS=("${CKPT_ARGS[@]}" --tiles 16)
    PROBE_ARGS=(shots=[5] seeds=1 probes=[linear])
  fi
  step bench_kernels 300 "$PYTHON" benchmarks/bench_kernels.py --quick --no-compile \
    ${KERNEL_ARGS[@]+"${KERNEL_ARGS[@]}"} --json "$OUT_DIR/bench_kernels.json"
  step bench_pretrain_tiny 300 "$PYTHON" benchmarks/bench_pretrain.py --quick \
    ${PRETRAIN_ARGS[@]+"${PRETRAIN_ARGS[@]}"} --json "$OUT_DIR/bench_pretrain.json"
  step bench_pretrain_ckpt 120 "$PYTHON" benchmarks/bench_pretrain.py --quick --sections objective --objectives mae \
    --activation-checkpointing both ${CKPT_ARGS[@]+"${CKPT_ARGS[@]}"} --json "$OUT_DIR/bench_pretrain_ckpt.json"
fi
if [ -n "$SCENE" ]; then
  step probe 180 "$PYTHON" -m hsfm_train.cli probe backbone=random "data.scene=$SCENE" "${PROBE_ARGS[@]}" \
    "output_dir=$OUT_DIR/probe_run"
  cp "$OUT_DIR/probe_run/summary.json" "$OUT_DIR/probe_summary.json" 2>/dev/null
  rm -rf "$OUT_DIR/probe_run"  # the device tool brings back files at most two folders down
else
  echo "== probe: skipped (no Indian Pines scene: set HSFM_PROBE_SCENE or copy it into .gpu_data/)"
fi
echo "gpu_suite: done, exit $status; figures in $OUT_DIR"
exit $status
