#!/usr/bin/env bash
# GPU check (BUILD_NOTES "GPU check"): evaluation throughput FP vs quantized (float32 and
# bfloat16), calibration, sensitivity and reconstruction times on an accelerator.
# Repo root. Needs DATA (default .device_data, git-ignored) prepared on the CPU machine with
#   bash benchmarks/gpu_check.sh prepare
# (the converted ResNet-18 CIFAR-10 checkpoint, cifar10/test.tar and the 256 calibration images
# that experiments.ptq samples from train.tar with seed 0, so figures compare with the CPU rows).
# Logs and results.json files go to OUT (default runs/gpu_check). Each step has its own time limit, so a
# slow step cannot take the later ones down with it.
set -u
PY=${PY:-python3}
DATA=${DATA:-.device_data}
OUT=${OUT:-runs/gpu_check}
ITERATIONS=${ITERATIONS:-300}  # Adam steps per reconstructed unit
WORK=${WORK:-$OUT/work}  # experiment workdirs (results.json is copied to OUT)
EXTRA=${EXTRA:-}  # more experiments.ptq flags (a CPU smoke run: EXTRA=--eval_images=100)

if [ "${1:-}" = prepare ]; then
  set -e
  mkdir -p "$DATA"
  .venv/bin/python - "$DATA" <<'EOF'
import sys, tarfile
from eqjax import data
src = data.open_dataset("tar:../shared/data/cifar10/train.tar")
names = [src.ids[i] for i in data.calibration_indices(src, 256, seed=0)]
with tarfile.open("../shared/data/cifar10/train.tar") as tin, \
        tarfile.open(f"{sys.argv[1]}/cifar10_calib256.tar", "w") as tout:
    for name in names:
        member = tin.getmember(name)
        tout.addfile(member, tin.extractfile(member))
EOF
  cp ../shared/data/cifar10/test.tar "$DATA/"
  rm -rf "$DATA/resnet18_cifar10" && cp -r runs/weights/resnet18_cifar10 "$DATA/"
  du -sh "$DATA"
  exit 0
fi

STEP_LINES="img/s|first|top-1|top1|unit .*ETA|wall|error:"
. benchmarks/device_steps.sh

R18="--model=resnet18_cifar --weights=$DATA/resnet18_cifar10 --batch_size=1000
  --calib_dataset=tar:$DATA/cifar10_calib256.tar --dataset=tar:$DATA/test.tar"
step bench "${BENCH_LIMIT:-210}" $PY -m benchmarks.gpu_bench --models=resnet18_cifar,deit_tiny,efficientnet_lite0
step r18_w4a4_brecq "${R18_LIMIT:-170}" $PY -m experiments.ptq $R18 --w_bits=4 --a_bits=4 --reconstruct=brecq \
  --recon_iterations=$ITERATIONS --recon_batch_size=16 --workdir="$WORK/r18_w4a4_brecq" $EXTRA
step lite0_w4a4_brecq_random "${LITE0_LIMIT:-180}" $PY -m experiments.ptq --model=efficientnet_lite0 \
  --weights=random --calib_dataset=tar:$DATA/cifar10_calib256.tar --dataset=tar:$DATA/test.tar \
  --eval_images=256 --batch_size=128 --w_bits=4 --a_bits=4 --reconstruct=brecq --recon_iterations=$ITERATIONS \
  --recon_batch_size=16 --workdir="$WORK/lite0_w4a4_brecq_random" $EXTRA
for run in r18_w4a4_brecq lite0_w4a4_brecq_random; do
  [ -f "$WORK/$run/ptq/results.json" ] && cp "$WORK/$run/ptq/results.json" "$OUT/$run.results.json"
done
