#!/usr/bin/env bash
# Start the 8B and 70B examples (README, "Large models"). Not run here (no GPU machine was
# available when this was written): these are the commands.
#
#   launch/llama_large.sh 8b-tp2                       # examples/llama8b/tp2_fsdp4_bf16.yaml, DeepSpeed launcher
#   launch/llama_large.sh 8b-fsdp8                     # examples/llama8b/fsdp8_bf16.yaml
#   launch/llama_large.sh 70b                          # examples/llama70b/tp8_fsdp4_ac_bf16.yaml, 8 nodes
#   NODE_RANK=0 launch/llama_large.sh 70b torchrun     # torchrun instead: run it on every node, NODE_RANK 0..N-1
#
# 8B: 2 nodes x 8 GPUs, group g = node g (launch/hostfile.example). 70B: 8 nodes x 8 GPUs, group g =
# nodes 4g+1..4g+4 (launch/hostfile8.example). Ranks must be numbered node by node (both launchers
# do): groups are contiguous ranks, TP ranks innermost, so TP stays inside a node. Extra arguments
# go to `codistill-ds train` (e.g. --set data.tokenizer=/path/to/llama3-tokenizer). Data and
# tokenizer paths in the YAMLs are relative to the launch directory.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-8b-tp2}" in
  8b-tp2)   CONFIG=examples/llama8b/tp2_fsdp4_bf16.yaml;   NODES=2; HOSTS=launch/hostfile.example ;;
  8b-fsdp8) CONFIG=examples/llama8b/fsdp8_bf16.yaml;       NODES=2; HOSTS=launch/hostfile.example ;;
  70b)      CONFIG=examples/llama70b/tp8_fsdp4_ac_bf16.yaml; NODES=8; HOSTS=launch/hostfile8.example ;;
  *) echo "usage: $0 8b-tp2|8b-fsdp8|70b [deepspeed|torchrun] [train arguments...]" >&2; exit 2 ;;
esac
LAUNCHER="${2:-deepspeed}"
MASTER="${MASTER_ADDR:-node-1}"
shift $(( $# < 2 ? $# : 2 ))

if [[ "$LAUNCHER" == deepspeed ]]; then
  exec deepspeed --hostfile "${HOSTFILE:-$HOSTS}" --master_addr "$MASTER" --master_port 29500 \
    --module codistill_ds.cli train --config "$CONFIG" "$@"
fi
exec torchrun --nnodes "$NODES" --node_rank "${NODE_RANK:?set NODE_RANK=0..$((NODES - 1)), node by node}" \
  --nproc_per_node 8 --master_addr "$MASTER" --master_port 29500 \
  -m codistill_ds.cli train --config "$CONFIG" "$@"
