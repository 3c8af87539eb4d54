#!/usr/bin/env bash
# Launch one training stage with the deepspeed launcher (ZeRO-2 or ZeRO-3 from DS_CONFIG).
#   launch/deepspeed.sh STAGE CONFIG [key=value ...]
# env: DS_CONFIG (launch/deepspeed/zero2.json), NNODES (1), NPROC_PER_NODE (1: GPUs per node), and with
#      NNODES > 1: HOSTFILE (/job/hostfile, MPI style), MASTER_ADDR, MASTER_PORT (29500). Run it on node 0,
#      which reaches the others over ssh; or, without ssh, on every node with NODE_RANK set.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
shift 2
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DS_CONFIG=${DS_CONFIG:-$HERE/deepspeed/zero2.json}
if [ ! -f "$DS_CONFIG" ]; then
    echo "$0: DS_CONFIG=$DS_CONFIG: no such file" >&2
    exit 1
fi
NNODES=${NNODES:-1}
NPROC_PER_NODE=${NPROC_PER_NODE:-1}
args=(--num_nodes "$NNODES" --num_gpus "$NPROC_PER_NODE")
if [ "$NNODES" -gt 1 ]; then
    args+=(--hostfile "${HOSTFILE:-/job/hostfile}"
           --master_addr "${MASTER_ADDR:?set MASTER_ADDR to node 0}" --master_port "${MASTER_PORT:-29500}")
    if [ -n "${NODE_RANK:-}" ]; then
        args+=(--no_ssh --node_rank "$NODE_RANK")
    fi
elif [ -n "${MASTER_PORT:-}" ]; then
    args+=(--master_port "$MASTER_PORT")
fi
# --no_local_rank: the train command reads LOCAL_RANK from the environment
exec deepspeed "${args[@]}" --no_local_rank --module reasonedit train --config "$CONFIG" --stage "$STAGE" \
    --deepspeed "$DS_CONFIG" "$@"
