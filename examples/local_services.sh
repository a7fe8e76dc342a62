# Shared by the examples' run_local.sh scripts (sourced, not run): the Python to use, a work
# directory, free ports, waiting for servers, stopping them on exit, and idempotent registration.
#
# After `source examples/local_services.sh NAME`: $PY, $SF (stepflow command array), $WORK (logs and
# state), $STEPFLOW_HOME (default $WORK/home), and the functions below. Servers started with
# `start_server LOG COMMAND...` are stopped, last first, when the script exits.

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3
fi
SF=("$PY" -m stepflow)
WORK=$(mktemp -d -t "stepflow-$1-XXXXXX")
export STEPFLOW_HOME=${STEPFLOW_HOME:-$WORK/home}
PIDS=()

need_docker() {  # dockerd and the base image, from scripts/services.sh
    docker info >/dev/null 2>&1 || { echo "error: dockerd does not answer: run 'sudo bash scripts/services.sh'" >&2; exit 1; }
    docker image inspect stepflow-base:py3.11 >/dev/null 2>&1 \
      || { echo "error: the stepflow-base:py3.11 image is missing: run 'sudo bash scripts/services.sh'" >&2; exit 1; }
}

need_plugins() {  # MODULE... : install the plugins of this checkout (editable) when a module is missing
    local module
    for module in "$@"; do
        "$PY" -c "import $module" 2>/dev/null && continue
        echo "installing plugins/${module//_/-} (editable)"
        "$PY" -m pip install -q -e "plugins/${module//_/-}"
    done
}

free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

start_server() {  # LOG COMMAND... : run in the background, stopped on exit
    local log=$1
    shift
    "$@" >"$log" 2>&1 &
    PIDS+=($!)
}

wait_tcp() {  # PORT NAME LOG: until the last server started listens, or fail with its output
    local pid=${PIDS[-1]}
    for _ in $(seq 1 300); do
        "$PY" -c "import socket, sys; socket.create_connection(('127.0.0.1', int(sys.argv[1])), 1)" "$1" 2>/dev/null \
            && return 0
        kill -0 "$pid" 2>/dev/null || { echo "error: $2 exited:" >&2; tail -20 "$3" >&2; exit 1; }
        sleep 0.1
    done
    echo "error: $2 did not listen on port $1 within 30 s:" >&2; tail -20 "$3" >&2; exit 1
}

stop_servers() {  # the last started first: a control plane stops its jobs before the storage goes
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        kill -TERM "${PIDS[$i]}" 2>/dev/null || true
        wait "${PIDS[$i]}" 2>/dev/null || true
    done
    echo "server logs: $WORK"
}
trap stop_servers EXIT

upsert() {  # KIND NAME [--type=FLAVOR] [--OPTION=VALUE]... : register, or update what exists
    local kind=$1 name=$2 args=()
    shift 2
    if "${SF[@]}" "$kind" describe "$name" >/dev/null 2>&1; then
        for a in "$@"; do [[ $a == --type=* ]] || args+=("$a"); done
        [ ${#args[@]} -eq 0 ] || "${SF[@]}" "$kind" update "$name" "${args[@]}"
    else
        "${SF[@]}" "$kind" register "$name" "$@"
    fi
}

upsert_stack() {  # NAME STACK-OPTIONS... : register or update the stack, then make it active
    local name=$1
    shift
    if "${SF[@]}" stack describe "$name" >/dev/null 2>&1; then
        "${SF[@]}" stack update "$name" "$@"
    else
        "${SF[@]}" stack register "$name" "$@"
    fi
    "${SF[@]}" stack set "$name"
}
