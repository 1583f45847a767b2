# Sourced by the device scripts (gpu_check.sh, gpu_followups.sh) after they set PY and OUT:
# records the device in OUT/device.txt and defines `step`, which prints the log lines that match
# STEP_LINES (an extended regex).
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
(nvidia-smi -L || true; $PY -c "import jax; print(jax.__version__, jax.devices())") 2>&1 | tee "$OUT/device.txt"

step() {  # step NAME SECONDS COMMAND...: runs COMMAND under a time limit, log in OUT/NAME.log
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  echo "== $name: exit $?, $((SECONDS - start)) s (limit $limit s)"
  grep -E "$STEP_LINES" "$OUT/$name.log" | tail -40
}
