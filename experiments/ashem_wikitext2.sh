#!/usr/bin/env bash
# The ASHEM experiment of issue 7 on WikiText-2: every run of Tables 1 and 2, then the
# threshold sweep and the tables. Each run writes its JSON under results/; a run whose
# JSON exists is skipped, and an interrupted run resumes from its checkpoint, so the
# script can be stopped and started again at any point.
#
#   LEGO_DATA_DIR=../shared/data/wikitext-2-v1 bash experiments/ashem_wikitext2.sh [STEP...]
#
# STEP: table1, table2 (seeds from SEEDS, default "0 1 2"), sweep, tables (default: all).
# EPOCHS (default 1) is the epoch budget of each Table 2 run on the full training split.
set -euo pipefail
cd "$(dirname "$0")/.."

SEEDS=${SEEDS:-"0 1 2"}
EPOCHS=${EPOCHS:-1}
CKPT=${CKPT:-runs/checkpoints}
MODELS=${MODELS:-runs/models}
# glibc returns large freed blocks to the OS at once; the CPU path allocates a
# chunk x vocabulary logits block per step, so keeping them mapped saves ~30% time.
export MALLOC_MMAP_THRESHOLD_=${MALLOC_MMAP_THRESHOLD_:-4000000000}
export MALLOC_TRIM_THRESHOLD_=${MALLOC_TRIM_THRESHOLD_:-4000000000}

train() {  # train OUT.json FLAG...: one run, skipped when OUT.json exists
    local out=$1 name
    shift
    name=$(basename "$out" .json)
    if [[ -f $out ]]; then
        echo "== $name: $out exists, skipped"
        return
    fi
    echo "== $name: python -m lego.train $*"
    python -m lego.train "$@" --quiet --out "$out" --checkpoint-dir "$CKPT/$name" --resume
}

table1() {  # the draft's protocol and settings (the trainer's defaults)
    train results/table1/ashem-seed-protocol-seed0.json --strategy ashem --protocol seed --seed 0
}

table2() {  # honest protocol, full training split, test-split numbers
    local full=(--samples 0 --epochs "$EPOCHS")
    for seed in $SEEDS; do
        train "results/table2/ashem-propagate-seed$seed.json" --strategy ashem "${full[@]}" \
            --seed "$seed" --context propagate --save-model "$MODELS/ashem-propagate-seed$seed.pt"
        # Same phase-1 model as the propagate run (phase 1 does not read --context).
        train "results/table2/ashem-routed-seed$seed.json" --strategy ashem "${full[@]}" \
            --seed "$seed" --context routed --save-model "$MODELS/ashem-routed-seed$seed.pt" \
            --phase1-from "$CKPT/ashem-propagate-seed$seed/phase1.pt"
        train "results/table2/standard-4l-seed$seed.json" --strategy standard --layers 4 \
            "${full[@]}" --seed "$seed"
        train "results/table2/deep-supervision-seed$seed.json" --strategy deep-supervision \
            --layers 4 --exit-layer 2 --exit-ratio 0.5 "${full[@]}" --seed "$seed" \
            --save-model "$MODELS/deep-supervision-seed$seed.pt"
    done
}

sweep() {  # exit ratio against test perplexity, seed 0's ASHEM and deep-supervision models
    python -m lego.experiment sweep "$MODELS/ashem-propagate-seed0.pt" \
        "$MODELS/deep-supervision-seed0.pt" --quiet \
        --json results/sweep/threshold-sweep-seed0.json --plot docs/threshold-sweep.png
}

tables() {
    python -m lego.experiment tables --out results/tables.md
}

for step in "${@:-table1 table2 sweep tables}"; do
    for s in $step; do "$s"; done
done
