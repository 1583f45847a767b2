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
