#!/usr/bin/env bash
# Launch one training stage with torchrun (DDP or FSDP2, as the stage config says).
#   launch/torchrun.sh STAGE CONFIG [key=value ...]
# env: NNODES (1), NPROC_PER_NODE (1), and with NNODES > 1: MASTER_ADDR, MASTER_PORT (29500) and
#      NODE_RANK (or SLURM_NODEID) on each node. Run it on every node of the job.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
shift 2
NNODES=${NNODES:-1}
NPROC_PER_NODE=${NPROC_PER_NODE:-1}
args=(--nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE")
if [ "$NNODES" -gt 1 ]; then
    NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-}}
    args+=(--node_rank "${NODE_RANK:?set NODE_RANK on each node}"
           --master_addr "${MASTER_ADDR:?set MASTER_ADDR to node 0}" --master_port "${MASTER_PORT:-29500}")
elif [ -n "${MASTER_PORT:-}" ]; then
    args+=(--master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "$MASTER_PORT")
else
    args+=(--standalone)
fi
exec torchrun "${args[@]}" -m reasonedit train --config "$CONFIG" --stage "$STAGE" "$@"
