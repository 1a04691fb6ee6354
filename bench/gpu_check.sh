#!/usr/bin/env bash
# GPU check of the throughput benchmark (docs/performance.md): the Trainer at its best settings (b),
# the bare PyTorch loop (c), train.py at its defaults (d) and with its best options (e, and e with
# torch.compile), all in bf16, on a bert-base-sized model (12 layers x 768, random weights built
# from a config: no hub needed). Prints a table with samples/s, MFU and peak GPU memory and writes
# $OUT_DIR/gpu.json. Then a short FSDP run on all visible GPUs (FSDP needs GPUs) whose final/
# must reload into a plain model.
#
#   bash bench/gpu_check.sh                     # about 10 minutes on one H100
#   STEPS=320 BATCH=32 REPEATS=3 MODES=b,d bash bench/gpu_check.sh
#
# Needs the project's requirements (with a CUDA build of torch) and the default data
# (made here by `fine-tune prepare-data` if missing). PEAK_FLOPS sets the device's
# dense bf16 peak for MFU where the card is not one the loop knows.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT=${OUT_DIR:-runs/bench_gpu}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"

if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
else
  echo "warning: no nvidia-smi; the benchmark runs on whatever torch finds" >&2
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
[ -f data/sentiment/train.jsonl ] || "$PY" -m fine_tune prepare-data

# bert-base-sized classifier for the 5 sentiment classes (names sorted, as the loop orders them)
"$PY" - "$OUT/bert-base-random" <<'PYEOF'
import sys

import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from fine_tune.core.model import resolve_model_path

torch.manual_seed(0)
names = ["negative", "neutral", "positive", "very negative", "very positive"]
config = BertConfig(num_labels=len(names), id2label=dict(enumerate(names)),
                    label2id={n: i for i, n in enumerate(names)})  # defaults: bert-base, 110M parameters
BertForSequenceClassification(config).save_pretrained(sys.argv[1])
AutoTokenizer.from_pretrained(resolve_model_path("all-MiniLM-L6-v2")).save_pretrained(sys.argv[1])  # BERT uncased vocab
PYEOF

"$PY" -m fine_tune bench --model "$OUT/bert-base-random" --precision bf16 --best bf16,fused \
  --modes "${MODES:-b,c,d,e,e+compile}" --steps "${STEPS:-160}" --warmup_steps "${WARMUP:-16}" --batch_size "${BATCH:-16}" \
  --repeats "${REPEATS:-2}" --eval_samples "${EVAL_SAMPLES:-1000}" --json "$OUT/gpu.json" ${PEAK_FLOPS:+--peak_flops "$PEAK_FLOPS"}

if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
  "$PY" -m accelerate.commands.launch --config_file accelerate_configs/fsdp.yaml --num_processes "$NGPU" \
    train.py --model_name_or_path "$OUT/bert-base-random" --train_file data/sentiment/train.jsonl \
    --validation_file data/sentiment/validation.jsonl --max_train_samples 2048 --max_eval_samples 512 \
    --max_steps 40 --logging_steps 10 --mixed_precision bf16 --eval_strategy no --save_strategy no \
    --output_dir "$OUT/fsdp" --overwrite_output_dir true --disable_tqdm true
  "$PY" -c "from transformers import AutoModelForSequenceClassification as M; M.from_pretrained('$OUT/fsdp/final')" \
    && echo "FSDP on $NGPU GPU(s): trained, evaluated, final/ reloads"
fi
