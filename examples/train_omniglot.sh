#!/usr/bin/env bash
# Omniglot recipe: Conv-4 ProtoNet, 60-way 1-shot episodes, each 90-degree rotation its own class,
# 5 alphabets of the background set held out for validation. Then evaluate and export a bundle.
#   bash examples/train_omniglot.sh [images_background.zip] [minutes] [out-dir]
set -euo pipefail
DATA=${1:-../shared/data/omniglot/images_background.zip}
MINUTES=${2:-15}
OUT=${3:-runs/omniglot-conv4}

fewshot-edge train --data omniglot --source "$DATA" --rotations --holdout 5 \
  --backbone conv4 --way 60 --shot 1 --query 5 --time-limit "$MINUTES" --episodes 100000 \
  --val-every 1000 --val-episodes 200 --seed 0 --out "$OUT"
for task in "5 1" "5 5" "20 1" "20 5"; do
  set -- $task
  fewshot-edge eval "$OUT/last.pt" --way "$1" --shot "$2" --episodes 1000
done
fewshot-edge export "$OUT/last.pt" --out "$OUT/bundle"
