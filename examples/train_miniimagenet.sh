#!/usr/bin/env bash
# miniImageNet recipe: ResNet-12 (or Conv-4) ProtoNet on the 64 training classes (three shards),
# validated on the 16 validation classes, 84x84 RGB, 20-way 5-shot 5-query episodes.
#   bash examples/train_miniimagenet.sh [data-dir] [backbone] [minutes] [out-dir]
# A GPU is advised for ResNet-12; on a CPU, add e.g. --max-per-class 100 and a few minutes for a smoke run.
set -euo pipefail
DATA=${1:-../shared/data/miniimagenet}
BACKBONE=${2:-resnet12}
MINUTES=${3:-60}
OUT=${4:-runs/miniimagenet-$BACKBONE}

fewshot-edge train --data folders --source "$DATA/train-0.zip" --source "$DATA/train-1.zip" \
  --source "$DATA/train-2.zip" --val-source "$DATA/val.zip" --image-size 84 --channels 3 \
  --backbone "$BACKBONE" --way 20 --shot 5 --query 5 --val-way 5 --val-shot 5 \
  --time-limit "$MINUTES" --episodes 60000 --val-every 1000 --val-episodes 200 --seed 0 --out "$OUT"
for shot in 1 5; do
  fewshot-edge eval "$OUT/best.pt" --way 5 --shot "$shot" --episodes 1000
done
