#!/usr/bin/env bash
# Every GPU check of this project in one device call (see ../shared/device/README.md).
# Here, once:   ../shared/device/wheelhouse.sh        (builds .whl/ and .device-data/, git-ignored)
# Device call:  command "bash benchmarks/gpu_check.sh", carry [".whl", ".device-data"], timeout_s 540
# Results land in $OUT; copy the medians and ratios into BENCHMARKS.md with the device name.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"
data=.device-data
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
# 1. char LSTM: runner vs plain loop (reference: 95-117k chars/s at bs 64 / bptt 8 on an H100)
timeout 150 python3 benchmarks/bench_lstm.py --device cuda --steps 1500 --repeats 3 --text $data/nietzsche.txt \
  2>&1 | grep -v INFO | tee "$OUT/bench_lstm.txt"
# 2. lesson7 Resnet2: runner (GPU-resident data, bf16, channels_last) vs a torchvision DataLoader loop
timeout 200 python3 benchmarks/bench_cifar.py --device cuda --steps 150 --repeats 3 --root $data/cifar10-jpg.tar.gz \
  2>&1 | grep -v INFO | tee "$OUT/bench_cifar.txt"
# 3. the notebook's Resnet2 accuracy and its training time (target: its accuracy in <= 20 s of training)
timeout 150 python3 -m lesson7_sweeps.train experiment=lesson7_resnet2 data.root=$data/cifar10-jpg.tar.gz \
  data.cache_dir=/tmp/cache trainer.progress=off tracking.uri=sqlite:////tmp/mlflow.db \
  hydra.run.dir=/tmp/run 2>&1 | grep -E "epoch|error" | tee "$OUT/lesson7_resnet2.txt"
exit 0
