#!/usr/bin/env bash
# The checks that need a GPU, in one script: the CUDA tests, bench_scale.py on cuda, and
# optionally the demo backbone's training stage. Writes logs under $OUT (default ./gpu-out).
#
#   bash benchmarks/gpu_checks.sh tests scale            # CUDA tests + scale benchmark
#   bash benchmarks/gpu_checks.sh sigma                  # σ's cost per MD step on cuda
#   bash benchmarks/gpu_checks.sh train WORKDIR SECONDS  # train_demo_model.py --stage train
#
# ``train`` times one epoch first and then trains as many epochs (10-60) as fit in
# SECONDS; it leaves the trained checkpoint, without optimizer states, in $OUT.
#
# On a machine without the project's packages, install them first (wheels, PYTHONPATH);
# see DESIGN.md section 5.
set -uo pipefail
out=${OUT:-gpu-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-8} OMP_WAIT_POLICY=PASSIVE
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$out/gpu.txt"
status=0
while [ $# -gt 0 ]; do
  case "$1" in
    tests)
      python3 -m pytest -p no:cacheprovider -q --maxfail=3 tests/test_cuda.py \
        tests/test_finetune.py::test_refits_run_on_the_requested_device 2>&1 \
        | tee "$out/tests.log" || status=1
      shift ;;
    scale|scale-quick)
      extra=""; [ "$1" = scale-quick ] && extra="--skip-jacobians"
      python3 benchmarks/bench_scale.py --device cuda --out /tmp/bench-scale $extra 2>&1 \
        | grep -v "Warning\|warnings.warn" | tee "$out/bench_scale.log" || status=1
      shift ;;
    sigma)
      python3 benchmarks/bench_sigma_step.py --device cuda --sizes 9 256 1024 2>&1 \
        | grep -v "Warning\|warnings.warn" | tee "$out/bench_sigma.log" || status=1
      shift ;;
    train)
      work=$2 seconds=$3
      start=$(date +%s)
      python3 scripts/train_demo_model.py --stage train --workdir "$work" --device "${TRAIN_DEVICE:-cuda}" \
        --threads 8 --epochs 1 > "$out/train-probe.log" 2>&1 || status=1
      # seconds of the probe's one epoch, from mtt's own log; the rest is start-up
      read -r epoch_s startup_s < <(python3 - "$work/train.log" "$(( $(date +%s) - start ))" <<'PY'
import datetime, re, sys
stamps = {}
for line in open(sys.argv[1]):
    for key in ("Starting training", "Training finished"):
        if key in line:
            stamps[key] = datetime.datetime.strptime(line[1:20], "%Y-%m-%d %H:%M:%S")
epoch = max(1.0, (stamps["Training finished"] - stamps["Starting training"]).total_seconds())
print(int(epoch), max(0, int(sys.argv[2]) - int(epoch)))
PY
)
      epochs=$(( (seconds - startup_s) / epoch_s ))
      epochs=$(( epochs < 10 ? 10 : (epochs > 60 ? 60 : epochs) ))
      probe="${epoch_s} s per epoch, ${startup_s} s start-up"
      echo "probe: ${probe}: training ${epochs} epochs" | tee "$out/train.log"
      python3 scripts/train_demo_model.py --stage train --workdir "$work" --device "${TRAIN_DEVICE:-cuda}" \
        --threads 8 --epochs "$epochs" 2>&1 | grep -v "^    |.*Warning" >> "$out/train.log" || status=1
      python3 -c "import sys; sys.path.insert(0, 'scripts'); import train_demo_model as t, pathlib as p; t.shipped_checkpoint(p.Path('$work/model.ckpt'), p.Path('$out/model.ckpt'))" \
        && cp "$work/train.json" "$out/" && cp "$work/train.log" "$out/mtt-train.log" 2>/dev/null || status=1
      shift 3 ;;
    *) echo "unknown section $1" >&2; exit 2 ;;
  esac
done
exit $status
