#!/usr/bin/env bash
# Issue 13 follow-ups (BUILD_NOTES.md), each a PART (default: all, in this order):
#   lite0_bc      EfficientNet-Lite0 W4A4 round-to-nearest + bias correction
#   lite0_brecq   EfficientNet-Lite0 W4A4 BRECQ (300 iterations x 16 images per unit), then its state
#                 reused with bias correction (not in the default PARTS: about 1.5 h on 2 cores)
#   r18_bc        ResNet-18 W4A4 BRECQ state of reconstruction_measurements.sh + bias correction
#   r18_mixed     ResNet-18 budgeted mixed precision (relative energy 0.13), without and with BRECQ
#   r18_iters     ResNet-18 W4A4 BRECQ at R18_ITERS iterations per unit (default "100 1000"; 300 is in
#                 reconstruction_measurements.sh)
#   r18_w2a4      ResNet-18 W2A4 round-to-nearest and BRECQ (300 iterations)
#   r18_fisher    ResNet-18 W4A4 BRECQ with the Fisher-weighted output loss
#   lite0_mse     EfficientNet-Lite0 round-to-nearest with MSE weight scales and/or MSE activation clips,
#                 with and without bias correction (W4A8, W4A4, W6A6)
#   r18_mse       ResNet-18 W4A4 and W2A4 with MSE weight scales and clips, round-to-nearest and BRECQ
#                 (300 iterations)
#   pareto        the accuracy-energy fronts with and without reconstruction
# Data as in reconstruction_measurements.sh; run from the repo root after it.
set -eu
. benchmarks/workloads.sh
RECON="--reconstruct=brecq --recon_batch_size=16"
MSE="--weight_method=mse --calib_method=mse"
for part in ${PARTS:-lite0_bc r18_bc r18_mixed r18_iters r18_w2a4 r18_fisher lite0_mse r18_mse pareto}; do
  case $part in
    lite0_bc) $PY -m experiments.ptq $LITE0 --bits=4 --bias_correction --workdir=runs/lite0_w4a4_bc ;;
    lite0_brecq)
      $PY -m experiments.ptq $LITE0 --bits=4 $RECON --recon_iterations=300 --workdir=runs/lite0_w4a4_brecq_300_b16
      $PY -m experiments.ptq $LITE0 --bits=4 $RECON --recon_iterations=300 --bias_correction \
        --recon_state=runs/lite0_w4a4_brecq_300_b16/ptq/reconstruction --workdir=runs/lite0_w4a4_brecq_300_b16_bc ;;
    r18_bc) $PY -m experiments.ptq $R18 --bits=4 $RECON --recon_iterations=300 --bias_correction \
              --recon_state=runs/r18c10_w4a4_brecq_300_b16/ptq/reconstruction --workdir=runs/r18c10_w4a4_brecq_300_b16_bc ;;
    r18_mixed)
      $PY -m experiments.mixed $R18 --strategy=budget --budget=0.13 --workdir=runs/r18c10_mixed_b013
      $PY -m experiments.mixed $R18 --strategy=budget --budget=0.13 $RECON --recon_iterations=300 \
        --sensitivity_json=runs/r18c10_mixed_b013/mixed/results.json --workdir=runs/r18c10_mixed_b013_brecq_300_b16 ;;
    r18_iters)
      for iterations in ${R18_ITERS:-100 1000}; do
        $PY -m experiments.ptq $R18 --bits=4 $RECON --recon_iterations=$iterations \
          --workdir=runs/r18c10_w4a4_brecq_${iterations}_b16
      done ;;
    r18_w2a4)
      $PY -m experiments.ptq $R18 --w_bits=2 --a_bits=4 --workdir=runs/r18c10_w2a4
      $PY -m experiments.ptq $R18 --w_bits=2 --a_bits=4 $RECON --recon_iterations=300 --workdir=runs/r18c10_w2a4_brecq_300_b16 ;;
    r18_fisher) $PY -m experiments.ptq $R18 --bits=4 $RECON --recon_iterations=300 --recon_fisher \
                  --workdir=runs/r18c10_w4a4_brecq_300_b16_fisher ;;
    lite0_mse)
      $PY -m experiments.ptq $LITE0 --w_bits=4 --a_bits=8 --weight_method=mse --workdir=runs/lite0_w4a8_wmse
      $PY -m experiments.ptq $LITE0 --w_bits=4 --a_bits=8 --weight_method=mse --bias_correction --workdir=runs/lite0_w4a8_wmse_bc
      $PY -m experiments.ptq $LITE0 --bits=4 $MSE --bias_correction --workdir=runs/lite0_w4a4_mse_bc
      $PY -m experiments.ptq $LITE0 --bits=6 $MSE --workdir=runs/lite0_w6a6_mse ;;
    r18_mse)
      $PY -m experiments.ptq $R18 --bits=4 $MSE --workdir=runs/r18c10_w4a4_mse
      $PY -m experiments.ptq $R18 --bits=4 $MSE $RECON --recon_iterations=300 --workdir=runs/r18c10_w4a4_mse_brecq_300_b16
      $PY -m experiments.ptq $R18 --w_bits=2 --a_bits=4 $MSE $RECON --recon_iterations=300 \
        --workdir=runs/r18c10_w2a4_mse_brecq_300_b16
      $PY -m experiments.ptq $R18 --w_bits=2 --a_bits=4 $MSE --workdir=runs/r18c10_w2a4_mse ;;
    pareto)
      $PY -m experiments.pareto --results='runs/r18c10_w*/ptq/results.json,runs/r18c10_mixed*/mixed/results.json' \
        --workdir=runs/pareto_r18
      $PY -m experiments.pareto --results='runs/lite0_w*/ptq/results.json' --workdir=runs/pareto_lite0 ;;
    *) echo "unknown part $part" >&2; exit 2 ;;
  esac
done
