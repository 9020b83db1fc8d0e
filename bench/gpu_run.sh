#!/bin/bash
# The GPU runs of BENCHMARKS.md in one command on a lent machine (see bench/gpu_prepare.sh for the layout and
# the calls before this one). Results land in $OUT (or ./gpu-out): logs, JSON, metrics. About 9 minutes at most
# (each step has its own timeout), so one device call of timeout_s 600 holds it.
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
G=.device/gpu
python3 -c "import bunmyaku" 2>/dev/null || python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# all-MiniLM-L6-v2, reassembled and checked; SmolLM2's shape with random weights (speed only)
mkdir -p bench/.cache/minilm && cp -r $G/common/minilm/. bench/.cache/minilm/
cat /tmp/stash/part00 /tmp/stash/part01 $G/p2/part02 > bench/.cache/minilm/model.safetensors
echo "$(cat $G/common/minilm.sha256)  bench/.cache/minilm/model.safetensors" | sha256sum -c - || exit 3
[ -f bench/.cache/smollm2/config.json ] || python3 -m bench.random_like $G/common/smollm2 bench/.cache/smollm2 >/dev/null
export BUNMYAKU_DATA=$G/common/data

timeout 90 python3 -m pytest -q -p no:cacheprovider tests/speed/test_cuda.py 2>&1 | tail -3
timeout 150 python3 -m bench --device cuda --only generate --reps 20 --warmup 2 --budget 6 --min-reps 10 \
  > "$OUT/bench_gen.log" 2>&1; echo "bench generate rc=$?"
timeout 100 python3 -m bench --device cuda --only encoder-train --reps 20 --warmup 3 > "$OUT/bench_train.log" 2>&1
echo "bench train rc=$?"
timeout 180 python3 -m bench.pretrain_mfu --data $G/common/data/tinyshakespeare/input.txt \
  --tokenizer $G/common/data/gpt2-tokenizer --output-dir /tmp/mfu --steps 80 --skip 30 --batch-size 32 \
  > "$OUT/mfu.log" 2>&1; echo "mfu rc=$?"; grep RESULT "$OUT/mfu.log"
grep -h "speed-up" "$OUT"/bench_*.log
cp bench/results/speed-cuda.json bench/results/pretrain-mfu-cuda.json "$OUT/" 2>/dev/null
