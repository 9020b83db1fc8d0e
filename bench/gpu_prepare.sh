#!/bin/bash
# Lay out what the GPU runs need in .device/gpu (git-ignored), for a lent machine that has torch and
# transformers but neither ../shared nor the PyPI weight packages, and receives at most 64 MiB per call
# (working tree included). all-MiniLM-L6-v2's 87 MB fp32 file travels in three parts, one per call:
#
#   bash bench/gpu_prepare.sh                       # here
#   call 1 (carry .device/gpu/p0): mkdir -p /tmp/stash && cp .device/gpu/p0/part* /tmp/stash/ && <work>
#   call 2 (carry .device/gpu/p1): cp .device/gpu/p1/part* /tmp/stash/
#   call 3 (carry .device/gpu/p2 .device/gpu/common): bash bench/gpu_run.sh
#
# Calls must follow each other while the machine is warm (it goes back after ~30 s idle with /tmp).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${BUNMYAKU_DATA:-../shared/data}
OUT=.device/gpu
PY=${PYTHON:-.venv/bin/python}
rm -rf "$OUT" && mkdir -p "$OUT/common/data" "$OUT/common/minilm" "$OUT/common/smollm2" "$OUT/p0" "$OUT/p1" "$OUT/p2"
MINILM=$($PY -c 'from bunmyaku.hub.packaged import packaged_model; print(packaged_model("all-MiniLM-L6-v2"))')
(cd "$MINILM" && tar cf - --exclude=model.safetensors .) | (cd "$OUT/common/minilm" && tar xf -)
sha256sum "$MINILM/model.safetensors" | cut -d' ' -f1 > "$OUT/common/minilm.sha256"
split -n 3 -d "$MINILM/model.safetensors" "$OUT/part."
for i in 0 1 2; do mv "$OUT/part.0$i" "$OUT/p$i/part0$i"; done
cp -r "$DATA/agnews" "$DATA/tinyshakespeare" "$DATA/gpt2-tokenizer" "$OUT/common/data/"
$PY - "$OUT/common/smollm2/config.json" <<'EOF'
import json, sys
from bunmyaku.hub.packaged import packaged_model
import bunmyaku
model = bunmyaku.from_pretrained(packaged_model("SmolLM2-135M-Instruct"))
json.dump(model.hf_config(), open(sys.argv[1], "w"), indent=1)
EOF
chmod -R u+w "$OUT"
du -sh "$OUT"/*
