#!/usr/bin/env bash
# Every GPU check of this project in one device call (see ../shared/device/README.md), each part
# under its own time-out, each writing $OUT/<part>.json as soon as it is done (a later part's
# time-out loses nothing); the script keeps to its own budget (8 min on an H100/H200, install
# included) and ends by printing the Markdown table for BENCHMARKS.md ($OUT/table.md).
#   Here, once:   ../shared/device/wheelhouse.sh        (builds .whl/ and .device-data/, git-ignored)
#   Device call:  command "bash benchmarks/gpu_check.sh", carry [".whl", ".device-data"], timeout_s 540
#   Rehearsal:    bash benchmarks/gpu_check.sh --rehearse
# --rehearse runs every part on the CPU at tiny sizes (same code, cuda -> cpu, steps cut, generated
# data) in <= 3 min on 2 cores, checks that every part wrote its JSON and the table appeared, and that
# what travels to the device (the tree, .whl, the data) stays under 64 MiB. The rehearsal runs
# wheelhouse.sh first; where it cannot run (it needs git's view of a clone and the package index), it
# prints why and counts the wheels at their last measured size instead (WHEELS_MB).
set -uo pipefail
cd "$(dirname "$0")/.."
rehearse=0; [ "${1:-}" = "--rehearse" ] && rehearse=1
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"; rm -f "$OUT"/*.json "$OUT/wheelhouse.log"
start=$SECONDS
export PYTHONUNBUFFERED=1
if [ $rehearse = 1 ]; then
  budget=300; device=cpu; py=python  # ~3 min on 2 quiet cores (the compiles are most of it); a cap
  wheelhouse=${WHEELHOUSE:-../shared/device/wheelhouse.sh}; wheels_mb=0
  if [ -e .git ] && [ -x "$wheelhouse" ] && "$wheelhouse" >"$OUT/wheelhouse.log" 2>&1; then :; else
    echo "wheelhouse.sh did not run here (its log's end follows); counting .whl at ${WHEELS_MB:=36} MB"
    tail -5 "$OUT/wheelhouse.log" 2>/dev/null | sed 's/^/  | /'; rm -rf .whl; wheels_mb=$WHEELS_MB
  fi
  data_dir=.device-data; [ -d "$data_dir" ] || data_dir=../shared/data
  carried=$( (git ls-files -co --exclude-standard -z | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1;
              du -sb .whl "$data_dir" 2>/dev/null | cut -f1; echo $((wheels_mb * 1048576))) |
            awk '{s += $1} END {print s}')
  echo "carried to the device: $((carried / 1048576)) MiB of 64 (tree + .whl + $data_dir)"
  [ "$carried" -le $((64 * 1048576)) ] || { echo "the carried folders exceed 64 MiB"; exit 1; }
  data=$(mktemp -d); trap 'rm -rf "$data"' EXIT
  $py benchmarks/gpu_parts.py tiny-data "$data"
  text=$data/text.txt; cifar=$data/cifar
  export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/gpu_check_inductor}  # parts share compiled graphs
  # a part timed out while compiling leaves an empty .so there, which every later run would load
  # (older than 2 minutes: not one that another run is writing now)
  find "$TORCHINDUCTOR_CACHE_DIR" -name '*.so' -size 0 -mmin +2 -delete 2>/dev/null
  # tiny sizes: a small LSTM and Resnet2, a few steps; every preset's own settings otherwise
  lstm_small=(model.n_hidden=32 model.n_layers=1 data.bs=8 data.bptt=8 data.random_bptt=false
              data.valid_from_line=null)
  cifar_small=(model.layers=[4,8] data.bs=16)
  lstm_steps=4; graph_steps=20; cifar_steps=2; repeats=1; lstm_fast=(trainer.epochs=2 "${lstm_small[@]}")
  # the replay's own graphs would cost another ~35 s of C++ compiling here: it rehearses eager
  resnet_fast=(trainer.epochs=2 "${cifar_small[@]}"); replay=(trainer.epochs=2 trainer.compile=off "${cifar_small[@]}")
  det=(experiment=lesson6_lstm "${lstm_small[@]}" trainer.epochs=1 trainer.max_steps=20)
  trials=2; sweep_small=("${lstm_small[@]}" trainer.epochs=1 trainer.max_steps=5 trainer.compile=off)
else
  budget=470; device=cuda; py=python3
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
  text=.device-data/nietzsche.txt; cifar=.device-data/cifar10-jpg.tar.gz
  lstm_small=(); cifar_small=(); lstm_steps=800; graph_steps=400; cifar_steps=150; repeats=3; lstm_fast=(); resnet_fast=(); replay=()
  det=(experiment=lesson6_lstm trainer.epochs=1 trainer.max_steps=300)
  trials=4; sweep_small=(trainer.epochs=2)
fi
text_data=(data.path=$text data.cache_dir=/tmp/l7cache)
cifar_data=(data.root=$cifar data.cache_dir=/tmp/l7cache)
lstm_ov=(--override data.valid_from_line=null); for o in "${lstm_small[@]}"; do lstm_ov+=(--override "$o"); done
cifar_ov=(); for o in "${cifar_small[@]}"; do cifar_ov+=(--override "$o"); done
all=()

# part NAME CAP_S COMMAND...: run it with min(CAP_S, the budget left) seconds; a part that writes no
# JSON (time-out, error) gets one that says so, and the table shows it
part() {
  local name=$1 cap=$2; shift 2
  all+=("$name")
  local left=$((budget - (SECONDS - start)))
  local t=$((cap < left ? cap : left))
  if [ $t -lt 10 ]; then echo "{\"part\": \"$name\", \"skipped\": \"budget\"}" >"$OUT/$name.json"; return; fi
  echo "== $name (up to ${t}s; $((SECONDS - start))s so far)"
  PART_S=$t timeout -k 5 $t "$@" >"$OUT/$name.log" 2>&1  # PART_S: what a part may give a subprocess
  local rc=$?
  grep -vE "INFO|Warning|warn" "$OUT/$name.log" | tail -4
  [ -f "$OUT/$name.json" ] || echo "{\"part\": \"$name\", \"failed\": \"rc $rc$([ $rc = 124 ] && echo ', timed out')\"}" >"$OUT/$name.json"
}

# 1. char LSTM: runner vs plain loop, eager (reference: 95-117k chars/s at bs 64 / bptt 8 on an H100)
part lstm 45 $py benchmarks/bench_lstm.py --device $device --steps $lstm_steps --repeats $repeats --text "$text" \
  "${lstm_ov[@]}" --json "$OUT/lstm.json"
# 2. the compiled LSTM step (loop cell, CUDA graphs per length bucket) vs the plain loop; loss equality
part lstm_compiled 75 $py benchmarks/bench_lstm.py --device $device --steps $lstm_steps --repeats $repeats \
  --text "$text" "${lstm_ov[@]}" --compile reduce-overhead --json "$OUT/lstm_compiled.json"
# 2b. trainer.cuda_graph: the whole LSTM step (loop cell, fused Adam) captured per length bucket, vs the
#     same step uncaptured and the eager step: chars/s, loss differences (lr 1e-2: see the drift section)
part lstm_graphed 40 $py benchmarks/gpu_parts.py graphed "$OUT" $graph_steps experiment=lesson6_lstm \
  "${text_data[@]}" trainer.device=$device "${lstm_small[@]}" data.random_bptt=true
# 3. Resnet2: runner (GPU-resident data, bf16, channels_last) vs a torchvision DataLoader loop; img/s
#    (its first run decodes the JPEGs into /tmp/l7cache, which the later parts reuse)
part cifar 90 $py benchmarks/bench_cifar.py --device $device --steps $cifar_steps --repeats $repeats \
  --root "$cifar" --cache-dir /tmp/l7cache "${cifar_ov[@]}" --json "$OUT/cifar.json"
# 4. no host-device sync in a Resnet2 epoch: torch.cuda.set_sync_debug_mode("error") around it
part sync 30 $py benchmarks/gpu_parts.py sync "$OUT" experiment=lesson7_resnet2_fast "${cifar_data[@]}" \
  trainer.device=$device "${resnet_fast[@]}"
# 5. the fast presets: training time to the notebook's figures (Resnet2 0.85 TTA; LSTM val loss 1.2524)
part resnet2_fast 45 $py benchmarks/gpu_parts.py curve "$OUT" resnet2_fast val_accuracy_tta 0.85 \
  experiment=lesson7_resnet2_fast "${cifar_data[@]}" trainer.device=$device "${resnet_fast[@]}"
part lstm_fast 55 $py benchmarks/gpu_parts.py curve "$OUT" lstm_fast val_loss 1.2524 \
  experiment=lesson6_lstm_fast "${text_data[@]}" trainer.device=$device "${lstm_fast[@]}"
# 6. deterministic reruns on the device: the largest metric difference
part determinism 35 $py benchmarks/gpu_parts.py determinism "$OUT" "${det[@]}" "${text_data[@]}" \
  trainer.device=$device
# 7. parallel trials on one device: a sweep's trials in sequence, then $trials at a time (joblib)
part parallel 70 $py benchmarks/gpu_parts.py parallel "$OUT" $trials $trials sweep=lstm_fast_search \
  "${text_data[@]}" trainer.device=$device "${sweep_small[@]}"
# 8. a full-length replay, the subset that fits: the notebook's Resnet2 (41 epochs, compiled) for as
#    many epochs as 60 s allow; the full LSTM replay (80 epochs, ~6 min) does not fit this script
part replay_resnet2 60 $py benchmarks/gpu_parts.py curve "$OUT" replay_resnet2 val_accuracy_tta 0.85 \
  experiment=lesson7_resnet2 trainer.compile=default "${cifar_data[@]}" trainer.device=$device "${replay[@]}"

echo "== table ($((SECONDS - start))s in all)"
if [ $rehearse = 1 ]; then
  $py benchmarks/gpu_parts.py table "$OUT" --check "${all[@]}" || exit 1
  [ -s "$OUT/table.md" ] || { echo "no table"; exit 1; }
  echo "rehearsal passed in $((SECONDS - start))s"
else
  $py benchmarks/gpu_parts.py table "$OUT"
fi
exit 0
