#!/bin/bash
# The GPU runs of BENCHMARKS.md on a lent machine, in stages of one device call each (see bench/gpu_prepare.sh).
# A session has ~11 minutes of device time after the machine starts: train (~6.5 min) and decode (~4 min) fit;
# mfu (~3 min) is for a session that has time left. Results land in $OUT (or ./gpu-out): logs, JSON rows, metrics.
#   bash bench/gpu_run.sh train    CUDA tests; variable-length fine-tuning rows, eager and compiled (+compile,
#                                  +compile:reduce-overhead); the fixed-length rows if time is left
#   bash bench/gpu_run.sh decode   generation rows
#   bash bench/gpu_run.sh mfu      GPT-2 124M pretraining MFU (bunmyaku pretrain, compiled)
export PYTHONUNBUFFERED=1
STAGE=${1:?usage: gpu_run.sh train|decode|mfu}
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
G=.device/gpu
python3 -c "import bunmyaku" 2>/dev/null || python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
# the real models' shapes with random weights (speed only)
for m in minilm smollm2; do
  [ -f bench/.cache/$m/config.json ] || python3 -m bench.random_like $G/$m bench/.cache/$m >/dev/null
done
start=$SECONDS
VAR=encoder-train/bert-base/variable,encoder-train/minilm/variable
ROWS="--reps 20 --warmup 3 --budget 4 --min-reps 20"
if [ "$STAGE" = train ]; then
  timeout 180 python3 -m pytest -q -p no:cacheprovider -rf tests/speed/test_cuda.py 2>&1 | tail -8
  timeout 30 python3 -m pytest -q -s -p no:cacheprovider tests/speed/test_cuda.py -k memory 2>&1 | grep "after each"
  echo "tests: $((SECONDS - start)) s"
  timeout 70 python3 -m bench --device cuda --only $VAR $ROWS > "$OUT/bench_train.log" 2>&1
  echo "eager rc=$? at $((SECONDS - start)) s"
  timeout 150 python3 -m bench --device cuda --only $VAR --compile $ROWS > "$OUT/bench_train_compile.log" 2>&1
  echo "compile rc=$? at $((SECONDS - start)) s"
  timeout 80 python3 -m bench --device cuda --only encoder-train/bert-base/variable --compile reduce-overhead $ROWS \
    > "$OUT/bench_train_ro.log" 2>&1; echo "reduce-overhead rc=$? at $((SECONDS - start)) s"
  grep -h "speed-up\|failed\|Error" "$OUT"/bench_train*.log | head -20
  if [ $((SECONDS - start)) -lt 330 ]; then
    timeout 60 python3 -m bench --device cuda --only encoder-train/bert-base/fixed,encoder-train/minilm/fixed $ROWS \
      > "$OUT/bench_train_fixed.log" 2>&1; echo "fixed rc=$? at $((SECONDS - start)) s"
    grep -h "speed-up\|failed" "$OUT/bench_train_fixed.log"
  fi
  cp bench/results/speed-cuda.json "$OUT/" 2>/dev/null
elif [ "$STAGE" = decode ]; then
  timeout 230 python3 -m bench --device cuda --only generate --reps 20 --warmup 2 --budget 5 --min-reps 10 \
    > "$OUT/bench_gen.log" 2>&1; echo "bench generate rc=$? at $((SECONDS - start)) s"
  grep -h "speed-up\|failed\|Error" "$OUT/bench_gen.log" | head -20
  cp bench/results/speed-cuda.json "$OUT/" 2>/dev/null
else
  timeout 170 python3 -m bench.pretrain_mfu --data $G/data/tinyshakespeare/input.txt \
    --tokenizer $G/data/gpt2-tokenizer --output-dir /tmp/mfu --steps 70 --skip 30 --batch-size 32 \
    > "$OUT/mfu.log" 2>&1; echo "mfu rc=$? at $((SECONDS - start)) s"; grep RESULT "$OUT/mfu.log" || tail -20 "$OUT/mfu.log"
  cp /tmp/mfu/metrics.jsonl "$OUT/pretrain-mfu-cuda-metrics.jsonl" 2>/dev/null
  cp bench/results/pretrain-mfu-cuda.json "$OUT/" 2>/dev/null
fi
