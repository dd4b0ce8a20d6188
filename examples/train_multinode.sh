#!/usr/bin/env bash
# Data-parallel training on several machines: run this same script on every node (docs/distributed.md).
# torchrun's c10d rendezvous meets at ENDPOINT (host:port of any one node); each node starts GPUS ranks.
#   NODES=2 GPUS=8 ENDPOINT=node0.example:29400 RUN_ID=omniglot-1 bash examples/train_multinode.sh \
#     [images_background.zip] [steps] [out-dir on a shared file system]
# The data must be at the same path on every node; only rank 0 writes OUT (its node is chosen by the
# rendezvous, so OUT should be shared). Learning rate: Adam's square-root rule, 1e-3 x sqrt(ranks).
set -euo pipefail
DATA=${1:-../shared/data/omniglot/images_background.zip}
STEPS=${2:-25000}
OUT=${3:-runs/omniglot-ddp}
NODES=${NODES:-1}
GPUS=${GPUS:-$( (nvidia-smi -L 2>/dev/null || true) | wc -l)}
[ "$GPUS" -gt 0 ] || GPUS=1  # no GPU: one CPU rank per node (gloo)
ENDPOINT=${ENDPOINT:-localhost:29400}
RUN_ID=${RUN_ID:-fewshot-edge-$(date +%Y%m%d)}
LR=$(python -c "print(1e-3 * ($NODES * $GPUS) ** 0.5)")

torchrun --nnodes "$NODES" --nproc_per_node "$GPUS" \
  --rdzv_backend c10d --rdzv_endpoint "$ENDPOINT" --rdzv_id "$RUN_ID" \
  -m fewshot_edge.cli train --data omniglot --source "$DATA" --rotations --holdout 5 \
  --backbone conv4 --way 60 --shot 1 --query 5 --episodes "$STEPS" --lr "$LR" \
  --val-every 1000 --val-episodes 200 --seed 0 --out "$OUT"
