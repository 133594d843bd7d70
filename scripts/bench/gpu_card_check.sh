#!/usr/bin/env bash
# Does the run card tell the truth (ISSUES_LOG B44)? On a CUDA box: `make rehearse PHASE=1a`, then the real train
# (STEPS steps), merge and full validation of the same config, each step's wall time next to the card's prediction.
#
#   bash scripts/bench/gpu_card_check.sh BASE_DIR TRAIN_JSONL [key=value ...]     # or: make bench-card BASE= DATA=
#   STEPS=40 WORK=checkpoints/card_check bash scripts/bench/gpu_card_check.sh /models/llama-8b \
#       data/phase1a/train.jsonl validate.data.math=EVAL/math500.jsonl validate.data.code=EVAL/humaneval.jsonl
#
# The card is asked for the same STEPS (train.max_steps), so its train line is comparable as it is; merge and
# validate are the phase's own (validation of every problem). Everything is written under WORK (runs/, card.json,
# logs, times.json); the phase's own run folder is never touched. PHASE=demo runs the same check on a CPU.
# ONLY="rehearse train" then ONLY="merge validate" splits it over two calls of a GPU box with a per-call time limit
# (each step's wall time is kept in WORK/<step>.seconds; the table is printed once all four are there).
# Exit 0 when every step ran (validation exit 1, gates failed on a short train, counts as ran), 2 otherwise.
set -uo pipefail
if [ $# -lt 2 ]; then
  sed -n '2,12p' "$0" >&2
  exit 2
fi
BASE=$1 DATA=$2
shift 2
STEPS=${STEPS:-40}
PHASE=${PHASE:-1a}
WORK=${WORK:-checkpoints/card_check}
PY=${PY:-.venv/bin/python}
export PYTHONPATH="$PWD/scripts${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false
mkdir -p "$WORK"
# make bench-card hands ARGS over as one string (never pasted into shell text): split into words, nothing expanded
read -ra EXTRA <<< "${COGUMI_ARGS:-}"
OVERRIDES="base_model=$BASE data.train_path=$DATA output_root=$WORK/runs train.max_steps=$STEPS $* ${EXTRA[*]}"
ONLY=" ${ONLY:-rehearse train merge validate} "

# step NAME OK_CODES make TARGET ...: run it, log it, keep its wall time; any other exit code stops the check.
# make says 2 for every failure: the script's own code comes from LAST_EXIT (the Makefile's RUN macro writes it).
step() {
  local name=$1 ok=$2 started code
  shift 2
  [[ "$ONLY" == *" $name "* ]] || return 0
  echo "== $name: $*"
  rm -f "$WORK/$name.exit"
  started=$EPOCHREALTIME
  "$@" LAST_EXIT="$WORK/$name.exit" 2>&1 | tee "$WORK/$name.log"
  code=${PIPESTATUS[0]}
  awk "BEGIN { print $EPOCHREALTIME - $started }" > "$WORK/$name.seconds"
  [ -s "$WORK/$name.exit" ] && code=$(cat "$WORK/$name.exit")
  if [[ " $ok " != *" $code "* ]]; then
    echo "gpu_card_check: $name exited $code (log: $WORK/$name.log)" >&2
    exit 2
  fi
}

step rehearse "0" make rehearse PHASE="$PHASE" ARGS="--card-json $WORK/card.json $OVERRIDES"
RESUME=0 FORCE=1 step train "0" make train PHASE="$PHASE" ARGS="$OVERRIDES"
FORCE=1 step merge "0" make merge PHASE="$PHASE" ARGS="$OVERRIDES"
step validate "0 1" make validate PHASE="$PHASE" ARGS="$OVERRIDES"

for name in train merge validate; do
  [ -s "$WORK/$name.seconds" ] || { echo "gpu_card_check: $name not timed yet (ONLY=\"$name\" runs it)"; exit 0; }
done
"$PY" - "$WORK/card.json" "$WORK/times.json" "$(cat "$WORK/train.seconds")" "$(cat "$WORK/merge.seconds")" \
  "$(cat "$WORK/validate.seconds")" <<'EOF'
import json, sys
card = json.load(open(sys.argv[1]))
real = dict(zip(("train", "merge", "validate"), map(float, sys.argv[3:6])))
rows = {k: {"card_s": card[f"{k}_s"], "real_s": round(v, 1)} for k, v in real.items()}
json.dump({"card": card, "steps": rows}, open(sys.argv[2], "w"), indent=1)
print(f"{'step':10}{'card':>12}{'real':>12}{'real/card':>11}")
for k, r in rows.items():
    ratio = r["real_s"] / r["card_s"] if r["card_s"] else float("nan")
    print(f"{k:10}{r['card_s']:>11.0f}s{r['real_s']:>11.0f}s{ratio:>11.2f}")
print(f"validate decode at the full run's batch: {card.get('validate_decode')}")
EOF
