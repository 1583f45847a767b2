#!/usr/bin/env bash
# ViT proxy on a GPU (BUILD_NOTES "A trained ViT proxy"): trains the DeiT-Tiny-width vit_tiny_cifar
# on 40,000 CIFAR-10 training images for as many epochs of its recipe as fit TRAIN_S seconds
# (bare step throughput from benchmarks.train_probe times LOOP_SHARE),
# returns its variables in pieces of at most 12 MB (benchmarks.checkpoint_pieces), and times
# one-pass sensitivity against the sweep (issue 16) on the same machine.
# Repo root. Needs DATA (default .device_vit, git-ignored) prepared on the CPU machine with
#   bash benchmarks/vit_gpu.sh prepare
# (40,000 of the 50,000 images of cifar10/train.tar and 2,000 of test.tar, seed 0: the whole
# training set does not fit the 64 MiB that travels to the device). Back here, the checkpoint
# joined, its FP32 top-1 measured on 1,000 test images, and both committed under weights/:
#   python -m benchmarks.checkpoint_pieces join OUT/vit runs/weights/vit_tiny_cifar10
#   python -m experiments.ptq --model=vit_tiny_cifar --weights=runs/weights/vit_tiny_cifar10 --bits=8 \
#     --dataset=tar:../shared/data/cifar10/test.tar --calib_dataset=tar:../shared/data/cifar10/train.tar \
#     --eval_images=1000 --batch_size=250 --workdir=runs/vit_check
#   python -m weights_convert.export --checkpoint=runs/weights/vit_tiny_cifar10 \
#     --out=weights/vit_tiny_cifar10/vit_tiny_cifar10.safetensors --train_results=OUT/train.results.json \
#     --check_results=runs/vit_check/ptq/results.json
set -u
PY=${PY:-python3}
DATA=${DATA:-.device_vit}
OUT=${OUT:-runs/vit_gpu}
WORK=${WORK:-/tmp/vit_gpu_work}  # outside OUT: the device tool empties OUT before each command
LOOP_SHARE=${LOOP_SHARE:-0.4}  # experiments.train's loop (eval + checkpoint per epoch) vs bare steps, measured on an H200
TRAIN_S=${TRAIN_S:-240}  # seconds of training steps (evaluation and checkpoints come on top)
EXTRA=${EXTRA:-}  # more experiments.train flags (a CPU smoke run: EXTRA="--train_images=512 --eval_images=128")
SENSITIVITY_MODELS=${SENSITIVITY_MODELS-resnet18_cifar efficientnet_lite0 deit_tiny}  # "" skips them
IMAGES=${IMAGES:-256}  # calibration images of the sensitivity timing

if [ "${1:-}" = prepare ]; then
  set -e
  mkdir -p "$DATA"
  .venv/bin/python - "$DATA" <<'EOF'
import sys, tarfile
from eqjax import data
for split, num in (("train", 40000), ("test", 2000)):
    path = f"../shared/data/cifar10/{split}.tar"
    source = data.open_dataset(f"tar:{path}")
    keep = data.sample_indices(len(source), num, seed=0)
    with tarfile.open(path) as tin, tarfile.open(f"{sys.argv[1]}/{split}{num // 1000}k.tar", "w") as tout:
        for i in keep:
            member = tin.getmember(source.ids[i])
            tout.addfile(member, tin.extractfile(member))
EOF
  du -sh "$DATA"
  exit 0
fi

mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
LOG=$OUT/log.txt
(nvidia-smi -L || true; $PY -c "import jax; print(jax.__version__, jax.devices())") 2>&1 | tee "$LOG"

step() {  # step NAME SECONDS COMMAND...: runs COMMAND under a time limit, output appended to LOG
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  echo "== $name" >>"$LOG"
  timeout "$limit" "$@" >>"$LOG" 2>&1
  echo "== $name: exit $?, $((SECONDS - start)) s (limit $limit s)" | tee -a "$LOG"
}

step probe 120 $PY -m benchmarks.train_probe --model=vit_tiny_cifar --train_images=40000 \
  --budget_s="$($PY -c "print($TRAIN_S * $LOOP_SHARE)")"
EPOCHS=$(grep -o '^EPOCHS=[0-9]*' "$LOG" | tail -1 | cut -d= -f2)
grep "img/s" "$LOG" | tail -1
step train $((TRAIN_S * 2 + 60)) $PY -m experiments.train --model=vit_tiny_cifar --num_classes=10 \
  --epochs="${EPOCHS:-1}" --dataset=tar:$DATA/train40k.tar --eval_dataset=tar:$DATA/test2k.tar \
  --log_every=500 --checkpoint_every=100000 --workdir="$WORK/vit" $EXTRA
grep -E "^.*epoch [0-9]+: " "$LOG" | tail -3
cp "$WORK/vit/train/results.json" "$OUT/train.results.json" 2>/dev/null
# final/ if training finished, else the newest checkpoint
step split 60 $PY -m benchmarks.checkpoint_pieces split "$WORK/vit/train" "$OUT/vit"

for model in $SENSITIVITY_MODELS; do
  step "second_order_$model" 150 $PY -m benchmarks.second_order_bench --model=$model --weights=random \
    --calib_dataset=tar:$DATA/train40k.tar --images=$IMAGES --loop=false --methods=fisher
  grep -E "sweep:|fisher" "$LOG" | tail -2
done
