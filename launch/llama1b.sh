#!/usr/bin/env bash
# Start examples/llama1b/*.yaml on 2 nodes x 8 GPUs: group 0 = node-1 (ranks 0-7), group 1 =
# node-2 (ranks 8-15). ZeRO/FSDP traffic stays inside each node; only the exchange crosses.
# Not run here (no GPU machine was available when this was written): these are the commands.
#
#   launch/llama1b.sh zero3            # DeepSpeed launcher, from node-1, hostfile below
#   NODE_RANK=0 launch/llama1b.sh fsdp2 torchrun    # torchrun, on each node (NODE_RANK 0 and 1)
#
# Data and tokenizer paths in the YAML are relative to the launch directory (see the YAML).
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG="examples/llama1b/${1:-zero3}_bf16.yaml"
LAUNCHER="${2:-deepspeed}"
MASTER="${MASTER_ADDR:-node-1}"
shift $(( $# < 2 ? $# : 2 ))

if [[ "$LAUNCHER" == deepspeed ]]; then
  # launch/hostfile.example: "node-1 slots=8" and "node-2 slots=8"
  exec deepspeed --hostfile launch/hostfile.example --master_addr "$MASTER" --master_port 29500 \
    --module codistill_ds.cli train --config "$CONFIG" "$@"
fi
exec torchrun --nnodes 2 --node_rank "${NODE_RANK:?set NODE_RANK=0 on node-1, 1 on node-2}" \
  --nproc_per_node 8 --master_addr "$MASTER" --master_port 29500 \
  -m codistill_ds.cli train --config "$CONFIG" "$@"
