#!/usr/bin/env bash
# Stop the dockerd and docker-registry that scripts/services.sh started (local cleanup).
# Uses only its pid files, so daemons started some other way are left alone.
set -euo pipefail

RUNDIR=${STEPFLOW_CI_STATE:-$HOME/.cache/stepflow-ci}/run

# Is pid $1 running? Zombies count as dead (state after the ") " in /proc/PID/stat).
running() { local st; st=$(cat "/proc/$1/stat" 2>/dev/null) || return 1; [[ ${st##*) } != Z* ]]; }

stop() {  # stop NAME COMM: TERM, wait up to 30 s, then KILL
  local pidfile=$RUNDIR/$1.pid pid i
  [ -s "$pidfile" ] || { echo "$1: not started by services.sh"; return 0; }
  pid=$(cat "$pidfile")
  # Check the command name so a stale pid file never kills a reused pid.
  if ! running "$pid" || [ "$(cat "/proc/$pid/comm" 2>/dev/null)" != "$2" ]; then
    echo "$1: not running (stale pid file)"; rm -f "$pidfile"; return 0
  fi
  kill -TERM "$pid"
  # dockerd stops its containers and its containerd before exiting.
  for ((i = 0; i < 60; i++)); do running "$pid" || break; sleep 0.5; done
  if running "$pid"; then echo "$1: still running after 30 s, killing"; kill -KILL "$pid"; fi
  rm -f "$pidfile"; echo "$1: stopped (pid $pid)"
}

stop registry docker-registry
stop dockerd dockerd
