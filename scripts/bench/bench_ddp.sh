#!/usr/bin/env bash
# Several GPUs on the GPU machine: one command, < 6 minutes on 2x H100, JSON under $OUT.
#
#   1. the 8B-shape bench (random weights, LoRA r16 all-linear, seq 2048, fast path, micro 2 x accum 4, 11 of 32
#      layers checkpointed = the probe's layout at 29 GiB): the trainer's optimizer step on 1 GPU, then on 2 GPUs
#      with DDP -> tokens/s per GPU and scaling (bench_train.py --ddp);
#   2. a short real `train` run with 2 GPUs (torchrun, exactly what `make train GPUS=2` launches) on a medium
#      Llama built here (hidden 1024, 8 layers; no download), demo data, checkpoint_layers=auto (rank 0's memory
#      probe, broadcast); checks one log, one summary, the checkpoints and the adapter (rank 0's outputs).
#
# Run from the repo root on the device (after `make gpu-wheels` put the pinned wheels in .whl/):
#   OUT=$OUT bash scripts/bench/bench_ddp.sh
# Outputs: $OUT/bench_ddp/bench_ddp-8b-*.json, $OUT/bench_ddp/train2.json (+ logs). Exit 0 when both parts worked.
set -uo pipefail
OUT=${OUT:-checkpoints}
DEST="$OUT/bench_ddp"
mkdir -p "$DEST"
PY=${PY:-python3}
if [ -d .whl ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 2
  export PYTHONPATH="/tmp/site:$PWD/scripts"
else
  export PYTHONPATH="$PWD/scripts${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv > "$DEST/gpus.csv" 2>&1
status=0

echo "== 1/2: 8B-shape bench, 1 GPU then 2 GPUs (DDP)"
timeout 240 "$PY" scripts/bench/bench_train.py --ddp --gpus 2 --phase 1a --timeout 150 --out-dir "$DEST" \
  2>&1 | tee "$DEST/bench_ddp.log" || status=1

echo "== 2/2: a short real training run with GPUS=2 (torchrun)"
BASE="$DEST/medium-base"
[ -d "$BASE" ] || "$PY" -c "
import sys, torch
from cogumi.demo.tiny import save_tiny_model
save_tiny_model(sys.argv[1], hidden_size=1024, layers=8, heads=16, kv_heads=4, intermediate_size=2816,
                max_positions=2048, dtype=torch.bfloat16)" "$BASE" || status=1
RUN_ARGS=(--phase demo "base_model=$BASE" "output_root=$DEST/runs" train.max_steps=60 checkpoints.save_steps=20
          train.micro_batch_size=8 train.grad_accum=2
          train.gradient_checkpointing=true train.checkpoint_layers=auto disk.interval=5)
start=$(date +%s)
timeout 150 "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 \
  scripts/train_phase1a_fullprecision.py "${RUN_ARGS[@]}" > "$DEST/train2.log" 2>&1
train_rc=$?
wall=$(( $(date +%s) - start ))
tail -12 "$DEST/train2.log"
"$PY" - "$DEST" "$train_rc" "$wall" <<'PYEOF' || status=1
import json, re, sys
from pathlib import Path
dest, rc, wall = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
run = dest / "runs" / "demo"
rows = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()] if (run / "train_log.jsonl").exists() else []
text = (dest / "train2.log").read_text(errors="replace")
layout = re.findall(r"batch: micro-batch .*", text)
out = {"exit": rc, "wall_s": wall, "steps_logged": [r["step"] for r in rows][-3:], "n_log_rows": len(rows),
       "first_loss": rows[0]["loss"] if rows else None, "final_loss": rows[-1]["loss"] if rows else None,
       "tokens_per_s_last": rows[-1]["tokens_per_s"] if rows else None, "layout": layout[-1] if layout else None,
       "checkpoints": sorted(p.name for p in run.glob("checkpoint-*")), "adapter": (run / "adapter").is_dir(),
       "summaries_printed": text.count("training done")}
(dest / "train2.json").write_text(json.dumps(out, indent=1) + "\n")
print(json.dumps(out))
ok = rc == 0 and out["adapter"] and rows and rows[-1]["step"] == 60 and out["summaries_printed"] == 1
sys.exit(0 if ok else 1)
PYEOF
exit $status
