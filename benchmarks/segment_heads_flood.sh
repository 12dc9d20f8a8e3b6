#!/usr/bin/env bash
# Light vs UperNet heads on the Sen1Floods11 chip (top half of the rows train, bottom half test), same
# encoders: a random initialisation of the s1s2 config and a quickly pretrained CoDe-MAE checkpoint
#   OMP_NUM_THREADS=1 taskset -c 0 .venv/bin/codemae pretrain --config configs/pretrain/codemae_s1s2_mstar.yaml \
#     run_dir=runs/seg_pretrain
# CPU-sized recipe (set before any result was seen): fine-tuned encoder, 100 iterations of batch 4, crop 64
# (the encoder's input size), lr 1e-4 (3e-5 is for 10k iterations), 10 warm-up iterations, layer decay
# 0.85, drop path 0.15, poly power 1; UperNet at 128 channels (512 is ~15x slower on one CPU core).
# MODE=frozen: the same with the encoder frozen (head only).
set -euo pipefail
CODEMAE="${CODEMAE:-.venv/bin/codemae}"
DATA="${DATA:-../shared/data/sen1floods11}"
OUT="${OUT:-runs/seg_bench}"
MODE="${MODE:-finetuned}"
FT=$([ "$MODE" = frozen ] && echo "" || echo "--finetune-encoder")
SUFFIX=$([ "$MODE" = frozen ] && echo "_frozen" || echo "")
mkdir -p "$OUT"
SCENE="$DATA/S2/Spain_7370579_S2Hand.tif $DATA/S1/Spain_7370579_S1Hand.tif $DATA/Labels/Spain_7370579_LabelHand.tif"
RECIPE="--opt-bands 3 2 1 --sar-bands 1 --sar-db -30 0 --modality both --seeds 3 $FT \
  --iters 100 --warmup-iters 10 --batch-size 4 --crop 64 --lr 1e-4 --device cpu"
for enc in "pretrained:--checkpoint runs/seg_pretrain/checkpoints/last.pt" "random:--random configs/pretrain/codemae_s1s2_mstar.yaml"; do
  name="${enc%%:*}"
  for head in "light:--head light" "upernet128:--head upernet --channels 128"; do
    hname="${head%%:*}"
    start=$(date +%s)
    # shellcheck disable=SC2086
    OMP_NUM_THREADS=1 taskset -c 0 $CODEMAE segment ${enc#*:} --scene $SCENE $RECIPE ${head#*:} \
      --out "$OUT/flood_${name}_${hname}${SUFFIX}.json"
    echo "wall ${MODE} ${name} ${hname}: $(( $(date +%s) - start )) s"
  done
done
