#!/usr/bin/env bash
# The README's evaluation numbers: CoDe-MAE vs joint MAE vs a random encoder of the same
# architecture, on the real data in ../shared/data. Needs the runs of
# configs/pretrain/mae_hivit_tiny_s1s2.yaml and configs/pretrain/codemae_tiny.yaml.
# Writes runs/eval/<protocol>_<encoder>.json; about 40 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=../shared/data
OUT=runs/eval
mkdir -p "$OUT"
declare -A ENC=(
  [codemae]="--checkpoint runs/codemae_tiny_s1s2/checkpoints/last.pt"
  [mae]="--checkpoint runs/mae_hivit_tiny_s1s2/checkpoints/last.pt"
  [random]="--random configs/pretrain/mae_hivit_tiny_s1s2.yaml"
)
CODEMAE=".venv/bin/codemae"
# segmentation at about the earlier cost (frozen encoder, light head, ~80 steps of 8 tiles at lr 1e-3);
# the papers' recipe (--head upernet --finetune-encoder, lr 3e-5, 10k iterations) is far beyond a CPU
SEGMENT="--head light --iters 80 --batch-size 8 --crop 64 --lr 1e-3"
for name in codemae mae random; do
  enc=${ENC[$name]}
  $CODEMAE retrieval $enc --pairs $DATA/s1s2_pairs --split val --out $OUT/retrieval_$name.json
  for k in 10 40; do
    $CODEMAE probe $enc --data $DATA/mstar/train_17deg --modality sar --shots $k --seeds 5 --centre-crop 128 \
      --out $OUT/probe_mstar_${k}shot_$name.json
  done
  $CODEMAE segment $enc --scene $DATA/sen1floods11/S2/Spain_7370579_S2Hand.tif \
    $DATA/sen1floods11/S1/Spain_7370579_S1Hand.tif $DATA/sen1floods11/Labels/Spain_7370579_LabelHand.tif \
    --opt-bands 3 2 1 --sar-bands 1 --sar-db -30 0 --modality both --seeds 3 $SEGMENT --out $OUT/segment_flood_$name.json
  $CODEMAE segment $enc --modality both --seeds 3 $SEGMENT --out $OUT/segment_synthetic_$name.json
  for k in 10 40; do
    $CODEMAE finetune $enc --data $DATA/mstar/train_17deg --modality sar --shots $k --seeds 5 \
      --out $OUT/finetune_mstar_${k}shot_$name.json
  done
done
