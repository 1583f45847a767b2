#!/usr/bin/env bash
# Issue 13, deployment-faithful options measured on/off (BUILD_NOTES.md): BatchNorm folding and
# bias correction with round-to-nearest. ResNet-18 (CIFAR stem, shared CIFAR-10 checkpoint; 256
# calibration images of train.tar, all 10,000 test images) and EfficientNet-Lite0 (package
# weights; 256 images of imagenet/calib, all 1,790 of imagenet/val). Repo root.
# MODELS (default r18 lite0); SETTINGS (default 4:4 4:8 6:6, as w_bits:a_bits);
# OPTIONS (default fold fold_bc; also none, bc).
set -eu
. benchmarks/workloads.sh
for m in ${MODELS:-r18 lite0}; do
  [ $m = r18 ] && ARGS=$R18 || ARGS=$LITE0
  for setting in ${SETTINGS:-4:4 4:8 6:6}; do
    w=${setting%:*}; a=${setting#*:}
    for option in ${OPTIONS:-fold fold_bc}; do
      case $option in
        none) flags="" ;; fold) flags="--fold_batchnorm" ;; bc) flags="--bias_correction" ;;
        fold_bc) flags="--fold_batchnorm --bias_correction" ;;
        *) echo "unknown option $option" >&2; exit 2 ;;
      esac
      $PY -m experiments.ptq $ARGS --w_bits=$w --a_bits=$a $flags --workdir=runs/${m}_w${w}a${a}_$option
    done
  done
done
