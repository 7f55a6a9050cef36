#!/usr/bin/env bash
# The GPU benchmarks in one prepared run (about 4 minutes on one H100/H200): fedlora's DP step
# against PEFT + Opacus in both of its modes (hooks, ghost) and the floor (throughput.py), ghost
# clipping against materialised per-example gradients (clipping.py), bf16 against fp32 (precision.py) and a pass's fixed cost
# in tokens (pass_cost.py), on a MiniLM-size (22.7M) and a BERT-base-size (110M) encoder.
#
#   bash benchmarks/gpu.sh [OUT_FOLDER]          (from the repository root; default
#                                                 benchmarks/results)
#
# The encoders are written with random weights by make_encoder.py (speed depends on shapes, not
# values), so nothing has to be downloaded on a machine that cannot: they need only a BERT
# tokenizer folder, the shipped model's by default or $TOKENIZER (vocab.txt, tokenizer.json,
# ...). Needs torch with CUDA, transformers, peft and opacus importable; PYTHONPATH=src is set
# here, so fedlora itself need not be installed. Each benchmark has its own time limit: one that
# runs over is cut and the rest still run. Results: OUT/*-cuda-{minilm,base}.json and
# OUT/pass-cost-cuda.json.
set -uo pipefail
OUT=${1:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONPATH="src:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}
$PY - <<'EOF' || exit 2
import sys
try:
    import torch
    import opacus, peft, transformers  # noqa: F401
    import fedlora.experiment  # noqa: F401  (and everything fedlora imports: cryptography, ...)
except ImportError as err:
    sys.exit(f"gpu.sh: needs torch with a CUDA device, transformers, peft, opacus and fedlora's "
             f"own dependencies; missing: {err.name} (carry it as a wheel)")
if not torch.cuda.is_available():
    sys.exit("gpu.sh: needs torch with a CUDA device; torch sees none")
EOF
WORK=$(mktemp -d)
TOK=${TOKENIZER:+--tokenizer $TOKENIZER}
$PY benchmarks/make_encoder.py "$WORK/minilm" --layers 6 --hidden 384 $TOK || exit 3
$PY benchmarks/make_encoder.py "$WORK/base" --layers 12 --hidden 768 $TOK || exit 3

bench() {  # bench SECONDS SCRIPT ARGS...: one benchmark under its own limit
    local limit=$1; shift
    echo "== $*"
    timeout "$limit" $PY "$@" || echo "(exit $?: cut at ${limit} s or failed; the rest still run)"
}
for size in minilm base; do
    model="model.path=$WORK/$size"
    bench 70 benchmarks/throughput.py "$model" --device cuda --repeats 3 --methods ffa lora \
        --reference ffa lora --opacus-modes hooks ghost --json "$OUT/throughput-cuda-$size.json"
    bench 40 benchmarks/clipping.py "$model" --device cuda --repeats 3 --methods ffa lora full \
        --json "$OUT/clipping-cuda-$size.json"
    bench 30 benchmarks/precision.py "$model" --device cuda --repeats 3 --methods ffa lora \
        --json "$OUT/precision-cuda-$size.json"
done
bench 20 benchmarks/pass_cost.py "model.path=$WORK/minilm" --device cuda --length 32 \
    --sizes 16 32 64 128 256 512 --json "$OUT/pass-cost-cuda.json"
rm -rf "$WORK"
