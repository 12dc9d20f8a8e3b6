#!/usr/bin/env bash
# docs/damage.md's table: a demo-pretrained vs a random tiny HiViT on generated bi-temporal damage scenes (CPU, one core).
set -euo pipefail
cd "$(dirname "$0")/.."
run() { OMP_NUM_THREADS=1 taskset -c 0 .venv/bin/codemae "$@"; }
[ -f runs/damage_pretrain/checkpoints/last.pt ] || run pretrain --config configs/pretrain/demo.yaml run_dir=runs/damage_pretrain
run synth --task damage --out runs/damage_data --n 30 --size 256 --seed 1000
for schedule in "--epochs 10 --seeds 3" "--epochs 15 --seeds 3"; do
  tag=$(echo "$schedule" | tr -d ' -')
  run damage --checkpoint runs/damage_pretrain/checkpoints/last.pt --data runs/damage_data $schedule \
    --crops-per-scene 4 --lr 1e-3 --out "runs/damage_results/pretrained_$tag.json"
  run damage --random configs/pretrain/demo.yaml --data runs/damage_data $schedule \
    --crops-per-scene 4 --lr 1e-3 --out "runs/damage_results/random_$tag.json"
done
