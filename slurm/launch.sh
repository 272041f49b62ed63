# shellcheck shell=bash
# Shared launcher of slurm/pretrain.sbatch and slurm/finetune.sbatch; sourced by them, not run on its own.
#
#   hsfm_slurm_launch STAGE [hydra overrides...]
#
# runs `hsfm STAGE overrides...` as one torchrun launcher per allocated node (srun --ntasks-per-node=1), with the
# rendezvous taken from Slurm's environment, forwards the preemption signal (SIGUSR1) to the training processes
# and, when the run stopped on that signal, requeues the job so that it resumes from output_dir's `latest`
# checkpoint. Outside a Slurm allocation it runs the same torchrun command on this machine (one node).
#
# Environment (all optional):
#   HSFM_VENV             virtual environment to activate (default: <repo>/.venv when it exists, else the PATH)
#   HSFM_REPO             the repository checkout (default: the folder above this file)
#   HSFM_PROCS_PER_NODE   training processes per node (default: GPUs on the node, 1 on a CPU-only node)
#   HSFM_TORCHRUN_ARGS    extra torchrun arguments, split on spaces (e.g. "--max_restarts 0 --tee 3")
#   HSFM_SRUN_ARGS        extra srun arguments, split on spaces (e.g. "--cpu-bind=none")
#   HSFM_MASTER_ADDR      rendezvous address (default: NodeAddr of the allocation's first node)
#   HSFM_MASTER_PORT      rendezvous port (default: 15000 + job id mod 15000)
#   HSFM_RESIGNAL_S       seconds between repeats of the forwarded SIGUSR1 while the step runs (default 30;
#                         0: forward once). A repeat reaches processes that were still starting up.
#   HSFM_MAX_RESTARTS     stop requeueing after this many restarts of the job (default 50)
#   HSFM_NO_REQUEUE=1     never requeue; a preempted run then just ends (exit 0) and can be resubmitted
#   ACCELERATE_USE_CPU    set to true on nodes without GPUs (done automatically when no GPU is found)

hsfm_slurm_log() { echo "hsfm-slurm: $*"; }

# The repository: HSFM_REPO, else the folder above this file (which the sbatch scripts source from the checkout).
hsfm_slurm_repo() {
    if [ -n "${HSFM_REPO:-}" ]; then
        echo "$HSFM_REPO"
    else
        (cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    fi
}

hsfm_slurm_activate() {
    local venv="${HSFM_VENV:-}"
    if [ -z "$venv" ] && [ -f "$HSFM_REPO/.venv/bin/activate" ]; then
        venv="$HSFM_REPO/.venv"
    fi
    if [ -n "$venv" ]; then
        # shellcheck disable=SC1091
        . "$venv/bin/activate" || { hsfm_slurm_log "cannot activate $venv"; return 1; }
    fi
    if ! python -c "import hsfm_train" 2>/dev/null; then
        hsfm_slurm_log "python ($(command -v python)) cannot import hsfm_train: set HSFM_VENV"
        return 1
    fi
}

# Sets HSFM_PROCS_PER_NODE: as given, else the GPUs Slurm gave this node, else the GPUs nvidia-smi lists, else 1
# process on the CPU (then also ACCELERATE_USE_CPU=true). Assumes the nodes of the job are alike.
hsfm_slurm_procs_per_node() {
    local gpus=0
    if [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then
        gpus=$SLURM_GPUS_ON_NODE
    elif command -v nvidia-smi >/dev/null 2>&1; then
        gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
    fi
    if [ "${gpus:-0}" -gt 0 ] 2>/dev/null; then
        HSFM_PROCS_PER_NODE=${HSFM_PROCS_PER_NODE:-$gpus}
    else
        export ACCELERATE_USE_CPU="${ACCELERATE_USE_CPU:-true}"
        HSFM_PROCS_PER_NODE=${HSFM_PROCS_PER_NODE:-1}
    fi
    export HSFM_PROCS_PER_NODE
}

hsfm_slurm_master_addr() {
    local first addr
    if [ -n "${HSFM_MASTER_ADDR:-}" ]; then
        echo "$HSFM_MASTER_ADDR"; return
    fi
    if [ -z "${SLURM_JOB_NODELIST:-}" ]; then
        echo 127.0.0.1; return
    fi
    first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
    addr=$(scontrol show node "$first" 2>/dev/null | grep -o 'NodeAddr=[^ ]*' | head -n1 | cut -d= -f2)
    echo "${addr:-$first}"
}

# output_dir of the composed config, made absolute against the working directory the run uses.
hsfm_slurm_output_dir() {
    python -m hsfm_train.cli "$@" --print-config | python -c '
import os, sys, yaml
print(os.path.abspath(yaml.safe_load(sys.stdin)["output_dir"]))'
}

# A stamp of output_dir/summary.json (its mtime in ns, or "none"): the file counts as this step's only when the
# stamp changed, whatever the clocks of the nodes and the file server say.
hsfm_slurm_summary_stamp() {
    python -c 'import os, sys; p = os.path.join(sys.argv[1], "summary.json")
print(os.stat(p).st_mtime_ns if os.path.exists(p) else "none")' "$1"
}

# stopped_by of output_dir/summary.json when its stamp differs from $2, else nothing.
hsfm_slurm_stopped_by() {
    python - "$1" "$2" <<'PY'
import json, os, sys
path = os.path.join(sys.argv[1], "summary.json")
if os.path.exists(path) and str(os.stat(path).st_mtime_ns) != sys.argv[2]:
    with open(path) as handle:
        print(json.load(handle).get("stopped_by") or "")
PY
}

_hsfm_slurm_signal_step() {
    # Under Slurm: every process of the job's steps on every node (not the batch shell); torchrun ignores USR1
    # and the trainer's handler in each worker sets the stop flag. Falls back to srun, which forwards signals to
    # its tasks. Outside Slurm: the workers, which are torchrun's children.
    if [ -n "${SLURM_JOB_ID:-}" ]; then
        scancel --signal=USR1 "$SLURM_JOB_ID" 2>/dev/null || kill -USR1 "$HSFM_STEP_PID" 2>/dev/null || true
    else
        pkill -USR1 -P "$HSFM_STEP_PID" 2>/dev/null || true
    fi
}

_hsfm_slurm_forward() {
    [ -n "$HSFM_FORWARDING" ] && return
    HSFM_FORWARDING=1
    hsfm_slurm_log "asking the training processes to checkpoint and stop (SIGUSR1)"
    _hsfm_slurm_signal_step
    if [ "${HSFM_RESIGNAL_S:-30}" -gt 0 ]; then
        (
            trap - USR1
            while sleep "${HSFM_RESIGNAL_S:-30}" && kill -0 "$HSFM_STEP_PID" 2>/dev/null; do
                _hsfm_slurm_signal_step
            done
        ) &
        HSFM_RESIGNAL_PID=$!
    fi
}

_hsfm_slurm_on_usr1() {
    HSFM_INTERRUPTED=1
    HSFM_PREEMPTED=1
    hsfm_slurm_log "SIGUSR1 received by the batch shell"
    if [ -n "$HSFM_STEP_PID" ] && kill -0 "$HSFM_STEP_PID" 2>/dev/null; then
        _hsfm_slurm_forward
    fi  # else: the step has not started yet (forwarded once it has) or has ended
}

hsfm_slurm_launch() {
    local stage="$1" output stamp rc stopped nnodes
    shift
    HSFM_REPO=$(hsfm_slurm_repo)
    export HSFM_REPO
    hsfm_slurm_activate || return 1
    export PYTHONUNBUFFERED=1

    output=$(hsfm_slurm_output_dir "$stage" "$@") || { hsfm_slurm_log "the config does not compose"; return 2; }
    hsfm_slurm_procs_per_node
    MASTER_ADDR=$(hsfm_slurm_master_addr)
    MASTER_PORT=${HSFM_MASTER_PORT:-$((15000 + ${SLURM_JOB_ID:-0} % 15000))}
    nnodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
    export MASTER_ADDR MASTER_PORT
    hsfm_slurm_log "job ${SLURM_JOB_ID:-none} (restart ${SLURM_RESTART_COUNT:-0}): hsfm $stage $*"
    hsfm_slurm_log "$nnodes node(s) x $HSFM_PROCS_PER_NODE process(es), rendezvous $MASTER_ADDR:$MASTER_PORT," \
                   "output_dir $output, cpu ${ACCELERATE_USE_CPU:-false}"

    # One launcher per node. USR1 is ignored in torchrun (its default action would kill it, and with it the
    # workers, before they checkpoint); the workers inherit SIG_IGN and the trainer installs its own handler.
    # shellcheck disable=SC2016,SC2086
    local node_command='trap "" USR1; exec python -m torch.distributed.run --nnodes "$SLURM_NNODES" '\
'--node_rank "$SLURM_NODEID" --nproc_per_node "$HSFM_PROCS_PER_NODE" --master_addr "$MASTER_ADDR" '\
'--master_port "$MASTER_PORT" $HSFM_TORCHRUN_ARGS -m hsfm_train.cli "$@"'
    stamp=$(hsfm_slurm_summary_stamp "$output")
    if [ -n "${SLURM_JOB_ID:-}" ]; then
        local cpus=()
        [ -n "${SLURM_CPUS_PER_TASK:-}" ] && cpus=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
        # shellcheck disable=SC2086
        srun --nodes="$nnodes" --ntasks="$nnodes" --ntasks-per-node=1 "${cpus[@]}" --kill-on-bad-exit=1 \
            ${HSFM_SRUN_ARGS:-} bash -c "$node_command" hsfm-node "$stage" "$@" &
    else
        SLURM_NNODES=1 SLURM_NODEID=0 bash -c "$node_command" hsfm-node "$stage" "$@" &
    fi
    HSFM_STEP_PID=$!
    [ -n "$HSFM_PREEMPTED" ] && _hsfm_slurm_forward  # the signal came while the config was composed
    # A trapped SIGUSR1 interrupts `wait` (status 128 + USR1, the step's status still to come): wait again.
    local interrupted=$((128 + $(kill -l USR1)))
    while :; do
        HSFM_INTERRUPTED=
        wait "$HSFM_STEP_PID"
        rc=$?
        [ -n "$HSFM_INTERRUPTED" ] && [ "$rc" -eq "$interrupted" ] || break
    done
    [ -n "$HSFM_RESIGNAL_PID" ] && kill "$HSFM_RESIGNAL_PID" 2>/dev/null
    HSFM_STEP_PID=

    stopped=$(hsfm_slurm_stopped_by "$output" "$stamp")
    hsfm_slurm_log "step ended: exit $rc, stopped_by '${stopped:-none}'"
    if [ "$rc" -ne 0 ]; then
        return "$rc"
    fi
    case "$stopped" in
        signal*)
            if [ -n "${HSFM_NO_REQUEUE:-}" ] || [ -z "${SLURM_JOB_ID:-}" ]; then
                hsfm_slurm_log "preempted, not requeued: the same command resumes from $output/checkpoints/latest"
            elif [ "${SLURM_RESTART_COUNT:-0}" -ge "${HSFM_MAX_RESTARTS:-50}" ]; then
                hsfm_slurm_log "preempted after ${SLURM_RESTART_COUNT} restarts (HSFM_MAX_RESTARTS): not requeued"
            else
                hsfm_slurm_log "preempted: requeueing job $SLURM_JOB_ID to resume from $output/checkpoints/latest"
                scontrol requeue "$SLURM_JOB_ID" || {
                    hsfm_slurm_log "scontrol requeue failed: resubmit the same command to resume"; return 1; }
            fi
            ;;
    esac
    return 0
}

# Installed as soon as this file is sourced, so a SIGUSR1 that comes while the config is composed is kept.
HSFM_PREEMPTED= HSFM_FORWARDING= HSFM_STEP_PID= HSFM_RESIGNAL_PID= HSFM_INTERRUPTED=
trap _hsfm_slurm_on_usr1 USR1
