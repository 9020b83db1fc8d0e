#!/bin/bash
# The GPU runs of BENCHMARKS.md on a lent machine (see bench/gpu_prepare.sh). One call runs the stages it names,
# in order, each cut to what is left of DEADLINE seconds (default 500) after the script started, so one call of a
# short lend does as much as fits and still returns. Results land in $OUT (or ./gpu-out): logs, JSON rows, metrics.
#   tests    the CUDA-only tests (tests/speed/test_cuda.py)
#   train    variable-length fine-tuning rows, eager and compiled (+compile)
#   extra    +compile:reduce-overhead (CUDA graphs) for BERT-base, then the fixed-length fine-tuning rows
#   diag     compiled BERT-base fine-tuning step profiled: kernels, GPU busy time, graphs and graph breaks
#   mfu      GPT-2 124M pretraining MFU (bunmyaku pretrain, compiled)
#   decode   generation rows
#   gputests every test marked gpu (the CUDA FlexAttention paths of DeBERTa, Longformer, BigBird, ModernBERT, ...)
#   deberta  DeBERTa-v3-base and BERT-base fine-tuning rows, fixed and variable, with the DeBERTa kernel peers
#            (--peers: disentangled-flash and flashdeberta, from the wheels gpu_prepare.sh lays out)
#   deberta-infer  the same for inference
#   long     long-input rows, 1k to 32k tokens: transformers Longformer, ours windowed, dense SDPA
#   e.g. OUT=$OUT bash bench/gpu_run.sh tests train mfu decode
export PYTHONUNBUFFERED=1
STAGES="tests train extra diag mfu decode gputests deberta deberta-infer long"
[ $# -gt 0 ] || { echo "usage: gpu_run.sh STAGE... ($STAGES)"; exit 2; }
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
DEADLINE=${DEADLINE:-500}
G=.device/gpu
exec 3>&1  # run's own messages reach the console when a command's output goes to a log
python3 -c "import bunmyaku" 2>/dev/null || python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null
if ls $G/wheels/*.whl >/dev/null 2>&1; then  # the DeBERTa kernel peers (pure Python wheels), for --peers
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    $G/wheels/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
# the real models' shapes with random weights (speed only)
for m in minilm smollm2; do
  [ -f bench/.cache/$m/config.json ] || python3 -m bench.random_like $G/$m bench/.cache/$m >/dev/null
done
# run LIMIT CMD...: CMD under the smaller of LIMIT and the time left before DEADLINE (skipped under 20 s)
run() {
  local limit=$1 left=$((DEADLINE - SECONDS)); shift
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 20 ]; then echo "skipped (deadline): $*" >&3; return 0; fi
  timeout "$limit" "$@"; local rc=$?; echo "rc=$rc at $SECONDS s: $*" >&3
}
VAR=encoder-train/bert-base/variable,encoder-train/minilm/variable
ROWS="--reps 20 --warmup 3 --budget 4 --min-reps 20"
for STAGE in "$@"; do
  echo "== $STAGE at $SECONDS s"
  case $STAGE in
  tests)
    run 180 python3 -m pytest -q -s -p no:cacheprovider -rf tests/speed/test_cuda.py > "$OUT/tests.log" 2>&1
    grep "after each" "$OUT/tests.log"; tail -8 "$OUT/tests.log" ;;
  train)
    run 70 python3 -m bench --device cuda --only $VAR $ROWS > "$OUT/bench_train.log" 2>&1
    run 150 python3 -m bench --device cuda --only $VAR --compile $ROWS > "$OUT/bench_train_compile.log" 2>&1
    grep -h "speed-up\|failed\|Error" "$OUT"/bench_train*.log | head -20 ;;
  extra)
    run 80 python3 -m bench --device cuda --only encoder-train/bert-base/variable --compile reduce-overhead $ROWS \
      > "$OUT/bench_train_ro.log" 2>&1
    run 60 python3 -m bench --device cuda --only encoder-train/bert-base/fixed,encoder-train/minilm/fixed $ROWS \
      > "$OUT/bench_train_fixed.log" 2>&1
    grep -h "speed-up\|failed\|Error" "$OUT/bench_train_ro.log" "$OUT/bench_train_fixed.log" | head -20 ;;
  diag)
    run 150 python3 -m bench.profile_step --device cuda --compile > "$OUT/profile_compile.txt" 2>&1
    grep -h "^==\|kernels per step\|^compiler\|graph break\|recompile" "$OUT/profile_compile.txt" ;;
  mfu)
    run 170 python3 -m bench.pretrain_mfu --data $G/data/tinyshakespeare/input.txt \
      --tokenizer $G/data/gpt2-tokenizer --output-dir /tmp/mfu --steps 70 --skip 30 --batch-size 32 \
      > "$OUT/mfu.log" 2>&1
    grep RESULT "$OUT/mfu.log" || tail -20 "$OUT/mfu.log"
    cp /tmp/mfu/metrics.jsonl "$OUT/pretrain-mfu-cuda-metrics.jsonl" 2>/dev/null
    cp bench/results/pretrain-mfu-cuda.json "$OUT/" 2>/dev/null ;;
  decode)
    run 230 python3 -m bench --device cuda --only generate --reps 20 --warmup 2 --budget 5 --min-reps 10 \
      > "$OUT/bench_gen.log" 2>&1
    grep -h "speed-up\|failed\|Error" "$OUT/bench_gen.log" | head -20 ;;
  gputests)
    run 240 python3 -m pytest -q -s -p no:cacheprovider -rfs -m gpu tests > "$OUT/gputests.log" 2>&1
    tail -15 "$OUT/gputests.log" ;;
  deberta)
    run 300 python3 -m bench --device cuda --only encoder-train/deberta-v3-base,encoder-train/bert-base --peers \
      $ROWS > "$OUT/bench_deberta.log" 2>&1
    grep -h "speed-up\|left out\|failed\|Error" "$OUT/bench_deberta.log" | head -20 ;;
  deberta-infer)
    run 200 python3 -m bench --device cuda --only encoder-infer/deberta-v3-base,encoder-infer/bert-base --peers \
      $ROWS > "$OUT/bench_deberta_infer.log" 2>&1
    grep -h "speed-up\|left out\|failed\|Error" "$OUT/bench_deberta_infer.log" | head -20 ;;
  long)
    run 300 python3 -m bench --device cuda --only long/ --reps 5 --warmup 2 > "$OUT/bench_long.log" 2>&1
    grep -h "x \|failed\|Error" "$OUT/bench_long.log" | head -30
    cp bench/results/long-cuda.json "$OUT/" 2>/dev/null ;;
  *) echo "unknown stage $STAGE ($STAGES)" ;;
  esac
  cp bench/results/speed-cuda.json "$OUT/" 2>/dev/null
done
echo "done at $SECONDS s"
