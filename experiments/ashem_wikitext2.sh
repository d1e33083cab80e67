#!/usr/bin/env bash
# The ASHEM experiment of issue 7 on WikiText-2: every run of Tables 1 and 2, then the
# threshold sweep and the tables. Each run writes its JSON under results/; a run whose
# JSON exists is skipped, and an interrupted run resumes from its checkpoint, so the
# script can be stopped and started again at any point.
#
#   LEGO_DATA_DIR=../shared/data/wikitext-2-v1 bash experiments/ashem_wikitext2.sh [STEP...]
#
# STEP: table1, table2 (seeds from SEEDS, default "0 1 2"), sweep, shape2 (Table 3: the
# second shape, dim 512, 8 layers, exit after 4; seeds from SHAPE2_SEEDS, default "0";
# its runs, then its sweep and plot), table4 (the draft's proposed shape, dim 128,
# 3 -> 6 layers, exit after 3, with the LayerSkip-style strategy; seed 0; TABLE4_SAMPLES
# training windows, default 0 = all, TABLE4_EPOCHS epochs, default EPOCHS, and
# TABLE4_EVAL_SAMPLES validation/test windows, default 0 = all), tables (default: all but
# shape2 and table4, which need hours of CPU per run). EPOCHS (default 1) is the epoch budget of each run of Tables 2 and 3
# on the full training split; SHAPE2_SAMPLES (default 0 = all) keeps only that many
# training windows in Table 3's runs (a smaller budget for a CPU); SWEEP_RATIOS (default:
# lego.experiment's) are the exit ratios of the sweeps, comma-separated.
# Several copies may run at once (e.g. two with OMP_NUM_THREADS=1 on two cores): a run
# in progress is locked by its process, the others move on to the next run.
set -euo pipefail
cd "$(dirname "$0")/.."

SEEDS=${SEEDS:-"0 1 2"}
EPOCHS=${EPOCHS:-1}
RESULTS=${RESULTS:-results}
SHAPE2_SEEDS=${SHAPE2_SEEDS:-"0"}
SHAPE2_SAMPLES=${SHAPE2_SAMPLES:-0}
SWEEP_RATIOS=${SWEEP_RATIOS:-}
TABLE4_SAMPLES=${TABLE4_SAMPLES:-0}
TABLE4_EPOCHS=${TABLE4_EPOCHS:-$EPOCHS}
TABLE4_EVAL_SAMPLES=${TABLE4_EVAL_SAMPLES:-0}
PLOT=${PLOT:-docs/threshold-sweep.png}
PLOT2=${PLOT2:-docs/threshold-sweep-shape2.png}
CKPT=${CKPT:-runs/checkpoints}
MODELS=${MODELS:-runs/models}
read -r -a EXTRA <<<"${EXTRA:-}"  # flags added to every run (tests: a tiny synthetic corpus)
# glibc returns large freed blocks to the OS at once; the CPU path allocates a
# chunk x vocabulary logits block per step, so keeping them mapped saves ~30% time.
export MALLOC_MMAP_THRESHOLD_=${MALLOC_MMAP_THRESHOLD_:-4000000000}
export MALLOC_TRIM_THRESHOLD_=${MALLOC_TRIM_THRESHOLD_:-4000000000}

claim() {  # claim NAME: succeeds when no live process of this script holds NAME's lock
    local lock=$CKPT/$1.lock pid
    mkdir -p "$CKPT"
    if ! mkdir "$lock" 2>/dev/null; then
        pid=$(cat "$lock/pid" 2>/dev/null || true)
        if [[ -n $pid && $pid != "$$" ]] && kill -0 "$pid" 2>/dev/null; then
            return 1
        fi  # else: this process's own lock, or that of a killed copy, taken over
    fi
    echo $$ >"$lock/pid"
}

train() {  # train OUT.json FLAG...: one run, skipped when OUT.json exists or is running
    local out=$1 name
    shift
    name=$(basename "$out" .json)
    if [[ -f $out ]]; then
        echo "== $name: $out exists, skipped"
        return
    fi
    if ! claim "$name"; then
        echo "== $name: running in another process, skipped"
        return
    fi
    echo "== $name ($(date -u +%FT%TZ)): python -m lego.train $*"
    python -m lego.train "$@" "${EXTRA[@]}" --quiet --out "$out" --checkpoint-dir "$CKPT/$name" \
        --resume
    rm -rf "$CKPT/$name.lock"
}

table1() {  # the original code's procedure, settings and model (the trainer's defaults + --arch)
    train "$RESULTS/table1/ashem-seed-protocol-seed0.json" --strategy ashem --protocol seed \
        --arch seed --seed 0
}

honest() {  # honest DIR SUFFIX LOW HIGH SEED FLAG...: the five rows of Table 2 (or 3)
    local dir=$1 suffix=$2 low=$3 high=$4 seed=$5
    shift 5
    local run=(--samples 0 --epochs "$EPOCHS" --seed "$seed" "$@")
    train "$dir/ashem-propagate$suffix-seed$seed.json" --strategy ashem "${run[@]}" \
        --phase1-layers "$low" --phase2-layers "$high" --context propagate \
        --save-model "$MODELS/ashem-propagate$suffix-seed$seed.pt"
    train "$dir/standard-${high}l$suffix-seed$seed.json" --strategy standard --layers "$high" \
        "${run[@]}"
    train "$dir/deep-supervision$suffix-seed$seed.json" --strategy deep-supervision \
        --layers "$high" --exit-layer "$low" --exit-ratio 0.5 "${run[@]}" \
        --save-model "$MODELS/deep-supervision$suffix-seed$seed.pt"
    # Same phase-1 model as the propagate run (phase 1 does not read --context).
    local phase1=$CKPT/ashem-propagate$suffix-seed$seed/phase1.pt
    if [[ -f $phase1 ]]; then
        train "$dir/ashem-routed$suffix-seed$seed.json" --strategy ashem "${run[@]}" \
            --phase1-layers "$low" --phase2-layers "$high" --context routed \
            --phase1-from "$phase1" --save-model "$MODELS/ashem-routed$suffix-seed$seed.pt"
    else
        echo "== ashem-routed$suffix-seed$seed: waits for $phase1 (the propagate run's phase 1)"
    fi
}

table2() {  # honest protocol, full training split, test-split numbers; the draft's shape
    for seed in $SEEDS; do
        honest "$RESULTS/table2" "" 2 4 "$seed"
    done
}

shape2() {  # Table 3: Table 2's rows where the layers cost more than the head
    for seed in $SHAPE2_SEEDS; do
        honest "$RESULTS/shape2" -shape2 4 8 "$seed" --dim 512 --heads 8 \
            --samples "$SHAPE2_SAMPLES"
    done
    sweep_models "$RESULTS/shape2-sweep" ashem-propagate-shape2-seed0 deep-supervision-shape2-seed0
    python -m lego.experiment plot "$RESULTS"/shape2-sweep/*.json --table2 "$RESULTS/shape2" \
        --out "$PLOT2"
}

table4() {  # the draft's proposed shape with the honest protocol, and the LayerSkip row
    local dir=$RESULTS/table4 seed=0
    local run=(--samples "$TABLE4_SAMPLES" --epochs "$TABLE4_EPOCHS" --seed "$seed" --dim 128)
    run+=(--eval-samples "$TABLE4_EVAL_SAMPLES")
    train "$dir/ashem-propagate-table4-seed$seed.json" --strategy ashem "${run[@]}" \
        --phase1-layers 3 --phase2-layers 6 --context propagate
    train "$dir/standard-6l-table4-seed$seed.json" --strategy standard --layers 6 "${run[@]}"
    train "$dir/deep-supervision-table4-seed$seed.json" --strategy deep-supervision \
        --layers 6 --exit-layer 3 --exit-ratio 0.5 "${run[@]}"
    train "$dir/layerskip-table4-seed$seed.json" --strategy layerskip --layers 6 \
        --exit-layer 3 --exit-ratio 0.5 "${run[@]}"
}

sweep_models() {  # sweep_models DIR NAME...: sweep each saved model into DIR/NAME.json
    local dir=$1 name
    shift
    for name in "$@"; do
        if [[ -f $dir/$name.json ]]; then
            echo "== sweep $name: exists, skipped"
        elif claim "sweep-$name"; then
            echo "== sweep $name ($(date -u +%FT%TZ))"
            python -m lego.experiment sweep "$MODELS/$name.pt" --quiet --json "$dir/$name.json" \
                ${SWEEP_RATIOS:+--exit-ratios "$SWEEP_RATIOS"}
            rm -rf "$CKPT/sweep-$name.lock"
        fi
    done
}

sweep() {  # exit ratio against test perplexity, seed 0's ASHEM and deep-supervision models
    sweep_models "$RESULTS/sweep" ashem-propagate-seed0 deep-supervision-seed0
    python -m lego.experiment plot "$RESULTS"/sweep/*.json --table2 "$RESULTS/table2" --out "$PLOT"
}

tables() {
    python -m lego.experiment tables --table1 "$RESULTS/table1" --table2 "$RESULTS/table2" \
        --shape2 "$RESULTS/shape2" --table4 "$RESULTS/table4" --out "$RESULTS/tables.md"
}

for step in "${@:-table1 table2 sweep tables}"; do
    for s in $step; do "$s"; done
done
