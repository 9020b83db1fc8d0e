#!/bin/bash
# Lay out what the GPU runs need in .device/gpu (git-ignored, a few MB), for a lent machine that has torch and
# transformers but neither ../shared nor the PyPI weight packages. Speed does not depend on the weights' values,
# so the GPU runs use random weights of the real models' shapes (bench.random_like): only configs and tokenizer
# files travel. Then one device call (carry .device/gpu) runs the stages that fit the lend, each cut to what is
# left of DEADLINE seconds (see bench/gpu_run.sh):
#
#   bash bench/gpu_prepare.sh                                               # here
#   OUT=$OUT DEADLINE=500 bash bench/gpu_run.sh tests train mfu decode      # on the GPU
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${BUNMYAKU_DATA:-../shared/data}
OUT=.device/gpu
PY=${PYTHON:-.venv/bin/python}
rm -rf "$OUT" && mkdir -p "$OUT/data" "$OUT/minilm" "$OUT/smollm2"
MINILM=$($PY -c 'from bunmyaku.hub.packaged import packaged_model; print(packaged_model("all-MiniLM-L6-v2"))')
(cd "$MINILM" && tar cf - --exclude='*.safetensors' --exclude='*.bin' --exclude='*.onnx' .) | (cd "$OUT/minilm" && tar xf -)
cp -r "$DATA/tinyshakespeare" "$DATA/gpt2-tokenizer" "$OUT/data/"
$PY - "$OUT/smollm2/config.json" <<'PYEOF'
import json, sys
from bunmyaku.hub.packaged import packaged_model
import bunmyaku
model = bunmyaku.from_pretrained(packaged_model("SmolLM2-135M-Instruct"))
json.dump(model.hf_config(), open(sys.argv[1], "w"), indent=1)
PYEOF
# the DeBERTa kernel peers of `python -m bench --peers` (pure Python; the GPU image has triton and einops)
$PY -m pip download -q --no-deps --disable-pip-version-check -d "$OUT/wheels" disentangled-flash==1.1.1 flashdeberta==0.0.8
chmod -R u+w "$OUT"
du -sh "$OUT"/*
