#!/usr/bin/env bash
# The paper's main comparison on the synthetic benchmark: base vs SFT vs Diffusion-DPO vs FocusDPO at equal steps,
# SEEDS seeds each, every run evaluated on the held-out split, then one table with 95 % confidence intervals.
#
#   scripts/reproduce.sh                 # defaults below; resumable: finished runs and evals are skipped
#   STEPS=400 SEEDS="0 1 2 3 4" BASE=bundled OUT=runs/repro scripts/reproduce.sh
#
# Environment: STEPS (200), SEEDS ("0 1 2"), BASE (bundled), OUT (runs/repro), EVAL_ARGS (extra `focusdpo eval`
# options, e.g. "--single 16 --multi 16 --samples 2"), TRAIN_ARGS (extra `focusdpo train` options, e.g.
# "--set dpo.beta=2000"), RESULTS (where the table goes; default $OUT/results.md), BIN (a built focusdpo binary;
# default: cargo build --release), TRAIN_ITEMS (train on a synthetic DIP set of this many items, generated once into
# $OUT/train-data with seed 2, instead of the 48 bundled items; the held-out eval split is seed 9001 either way),
# OBJECTIVES ("sft dpo focus-dpo").
set -euo pipefail
cd "$(dirname "$0")/.."
steps="${STEPS:-200}"
seeds="${SEEDS:-0 1 2}"
base="${BASE:-bundled}"
out="${OUT:-runs/repro}"
results="${RESULTS:-$out/results.md}"
eval_args="${EVAL_ARGS:-}"
train_args="${TRAIN_ARGS:-}"
train_items="${TRAIN_ITEMS:-}"
objectives="${OBJECTIVES:-sft dpo focus-dpo}"

if [ -z "${BIN:-}" ]; then
    cargo build --release --bin focusdpo
    BIN="${CARGO_TARGET_DIR:-target}/release/focusdpo"
fi
mkdir -p "$out"
log="$out/reproduce.log"
echo "== $(date -u +%FT%TZ) steps=$steps seeds=[$seeds] base=$base train_items=${train_items:-bundled}" | tee -a "$log"
data_args=""
if [ -n "$train_items" ]; then
    if [ ! -f "$out/train-data/metadata.jsonl" ]; then
        "$BIN" dip synth --out "$out/train-data" --items "$train_items" --seed 2 | tee -a "$log"
    fi
    data_args="--data $out/train-data"
fi

# The base alone (no training: one evaluation).
if [ ! -f "$out/base/eval.json" ]; then
    # shellcheck disable=SC2086
    "$BIN" eval --base "$base" --out "$out/base" $eval_args | tee -a "$log"
fi

for objective in $objectives; do
    for seed in $seeds; do
        run="$out/$objective-s$seed"
        if [ ! -f "$run/checkpoints/step-$steps/lora.safetensors" ]; then
            if [ -f "$run/config.toml" ]; then
                "$BIN" train --out "$run" --resume --steps "$steps" --plain >>"$log" 2>&1
            else
                # shellcheck disable=SC2086
                "$BIN" train --base "$base" --objective "$objective" --steps "$steps" --seed "$seed" \
                    --out "$run" --plain $data_args $train_args >>"$log" 2>&1
            fi
            rm -rf "$run/eval"
        fi
        if [ ! -f "$run/eval/eval.json" ]; then
            # shellcheck disable=SC2086
            "$BIN" eval --run "$run" --out "$run/eval" $eval_args >>"$log" 2>&1
        fi
        echo "$(date -u +%T) $run done" | tee -a "$log"
    done
done

paths=("$out/base")
for objective in $objectives; do
    for seed in $seeds; do paths+=("$out/$objective-s$seed"); done
done
"$BIN" report "${paths[@]}" --out "$results" --json "${results%.md}.json"
echo "table → $results"
