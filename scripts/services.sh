#!/usr/bin/env bash
# Prepare this Debian bookworm machine for the Docker-based tests: dockerd, a local
# registry on 127.0.0.1:5000 and the stepflow-base:py3.11 image (built with debootstrap,
# since no image can be pulled). Idempotent: every phase is skipped when already done.
set -euo pipefail

STATE=${STEPFLOW_CI_STATE:-$HOME/.cache/stepflow-ci}
mkdir -p "$STATE"
STATE=$(cd "$STATE" && pwd)   # absolute: the registry config needs it
LOGDIR=$STATE/logs RUNDIR=$STATE/run CACHE=$STATE/cache
mkdir -p "$LOGDIR" "$RUNDIR" "$CACHE"

REGISTRY=127.0.0.1:5000
IMAGE=stepflow-base:py3.11
ROOTFS_TAR=$CACHE/stepflow-base-py3.11-rootfs.tar
PKGS=(docker.io docker-registry debootstrap)
export DEBIAN_FRONTEND=noninteractive

die() { echo "services.sh: ERROR: $*" >&2; exit 1; }
log() { echo "services.sh: $*" >&2; }
declare -A TIMES
phase_start() { T0=$EPOCHREALTIME; }
phase_end() { TIMES[$1]=$(awk -v a="$T0" -v b="$EPOCHREALTIME" 'BEGIN{printf "%.1f", b-a}'); }
TMP_POLICY=
on_exit() {
  local rc=$?
  [ -z "$TMP_POLICY" ] || rm -f /usr/sbin/policy-rc.d
  [ $rc -eq 0 ] || echo "services.sh: FAILED (exit $rc), logs in $LOGDIR" >&2
}
trap on_exit EXIT

# ---- 1. packages --------------------------------------------------------------------
phase_start
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  log "installing ${missing[*]}"
  # Keep maintainer scripts from starting Debian's own dockerd / registry (with auth):
  # we start both ourselves with our own flags and config.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    TMP_POLICY=1; printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d
  fi
  apt-get update -qq >"$LOGDIR/apt.log" 2>&1 || { tail -20 "$LOGDIR/apt.log" >&2; die "apt-get update failed"; }
  # Recommends (needrestart, apparmor, cgroupfs-mount, ...) are not needed and slow the install.
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >>"$LOGDIR/apt.log" 2>&1 \
    || { tail -20 "$LOGDIR/apt.log" >&2; die "apt-get install ${missing[*]} failed"; }
fi
phase_end packages

# ---- 2. dockerd ---------------------------------------------------------------------
docker_up() { timeout 10 docker info >/dev/null 2>&1; }
# Is pid $1 running? Zombies count as dead (state after the ") " in /proc/PID/stat).
running() { local st; st=$(cat "/proc/$1/stat" 2>/dev/null) || return 1; [[ ${st##*) } != Z* ]]; }
# Is the pid in file $1 a running process named $2? (a stale pid file may name a reused pid)
alive() {
  local pid; pid=$(cat "$1" 2>/dev/null) || return 1
  running "$pid" && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ]
}
# Wait up to 60 s for the socket; 0 = up, 1 = dockerd exited (e.g. storage driver unusable).
wait_dockerd() {
  local i
  for ((i = 0; i < 60; i++)); do
    docker_up && return 0
    running "$1" || return 1
    sleep 1
  done
  tail -30 "$LOGDIR/dockerd.log" >&2
  die "dockerd did not answer on /var/run/docker.sock within 60 s"
}

phase_start
if ! docker_up; then
  if alive "$RUNDIR/dockerd.pid" dockerd; then   # ours, still starting: don't start a second
    wait_dockerd "$(cat "$RUNDIR/dockerd.pid")" || die "dockerd exited; see $LOGDIR/dockerd.log"
  else
    # overlay2 is fast; vfs (full copies, slow) is the fallback when overlay mounts fail.
    started=
    for driver in ${STEPFLOW_DOCKER_STORAGE_DRIVER:-overlay2 vfs}; do
      log "starting dockerd (storage driver $driver)"
      rm -f "$RUNDIR/dockerd.pid"   # stale after a kill -9; dockerd refuses a pid file of a live pid
      setsid dockerd --storage-driver "$driver" --pidfile "$RUNDIR/dockerd.pid" \
        >"$LOGDIR/dockerd.log" 2>&1 </dev/null &
      if wait_dockerd $!; then started=1; break; fi
      log "dockerd exited with storage driver $driver:"; tail -5 "$LOGDIR/dockerd.log" >&2
    done
    [ -n "$started" ] || die "dockerd failed to start with any storage driver; see $LOGDIR/dockerd.log"
  fi
fi
phase_end dockerd

# ---- 3. registry --------------------------------------------------------------------
# HTTP status of GET /v2/ (000 = nothing listening); bash /dev/tcp needs no curl.
registry_status() {
  ( exec 3<>"/dev/tcp/${REGISTRY%:*}/${REGISTRY#*:}" || exit 1
    printf 'GET /v2/ HTTP/1.0\r\nHost: %s\r\n\r\n' "$REGISTRY" >&3
    read -r -t 5 _ code _ <&3 && echo "$code" ) 2>/dev/null || echo 000
}

phase_start
status=$(registry_status)
if [ "$status" != 200 ] && [ "$status" != 000 ]; then
  # Something else owns the port, e.g. Debian's packaged service (htpasswd auth -> 401).
  log "127.0.0.1:5000 answers HTTP $status, stopping the packaged docker-registry service"
  { systemctl stop docker-registry || service docker-registry stop; } >/dev/null 2>&1 || true
  sleep 1; status=$(registry_status)
  [ "$status" = 000 ] || die "127.0.0.1:5000 answers HTTP $status and is not our registry; stop it"
fi
if [ "$status" = 000 ]; then
  if ! alive "$RUNDIR/registry.pid" docker-registry; then   # else ours is still starting
    mkdir -p "$STATE/registry"
    cat >"$STATE/registry.yml" <<EOF
version: 0.1
log:
  level: info
storage:
  filesystem:
    rootdirectory: $STATE/registry
  delete:
    enabled: true
http:
  addr: $REGISTRY
EOF
    log "starting docker-registry on $REGISTRY"
    setsid /usr/bin/docker-registry serve "$STATE/registry.yml" >"$LOGDIR/registry.log" 2>&1 </dev/null &
    echo $! >"$RUNDIR/registry.pid"
  fi
  for ((i = 0; i < 30; i++)); do
    [ "$(registry_status)" = 200 ] && break
    running "$(cat "$RUNDIR/registry.pid")" || break
    sleep 0.5
  done
  [ "$(registry_status)" = 200 ] || { tail -20 "$LOGDIR/registry.log" >&2; die "registry /v2/ did not answer 200 (see $LOGDIR/registry.log)"; }
fi
phase_end registry

# ---- 4. base image ------------------------------------------------------------------
# First "deb" source for bookworm in apt's own config, so debootstrap uses the same mirror.
apt_mirror() {
  local f m
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*; do
    [ -f "$f" ] || continue
    case $f in
      *.list) m=$(awk '$1=="deb" { i=2; if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
                 if ($(i+1)=="bookworm") { print $i; exit } }' "$f") ;;
      *.sources) m=$(awk -v RS= -F'\n' '{ t=s=u=""; en="yes"
                   for (i=1; i<=NF; i++) { if ($i ~ /^#/) continue
                     k=tolower($i); sub(/:.*/, "", k); v=$i; sub(/^[^:]*:[ \t]*/, "", v)
                     if (k=="types") t=v; else if (k=="suites") s=v; else if (k=="uris") u=v; else if (k=="enabled") en=tolower(v) }
                   if ((" " t " ") ~ / deb / && (" " s " ") ~ / bookworm / && en != "no") { split(u, a, " "); print a[1]; exit } }' "$f") ;;
      *) continue ;;   # apt ignores other names (e.g. *.disabled)
    esac
    [ -z "$m" ] || { echo "$m"; return; }
  done
}

build_rootfs() {
  local dir=$STATE/rootfs.build mirror t0=$EPOCHREALTIME
  mirror=${STEPFLOW_DEBIAN_MIRROR:-$(apt_mirror)}
  [ -n "$mirror" ] || die "no 'deb ... bookworm' source found in /etc/apt/sources.list{,.d/*}"
  # An interrupted debootstrap can leave proc/sys mounted inside: unmount before rm -rf.
  awk -v d="$dir/" 'index($2, d)==1 {print $2}' /proc/mounts | sort -r | xargs -r umount -l
  rm -rf --one-file-system "$dir"
  log "debootstrap bookworm from $mirror (a few minutes)"
  debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,ca-certificates \
    bookworm "$dir" "$mirror" >"$LOGDIR/debootstrap.log" 2>&1 \
    || { tail -20 "$LOGDIR/debootstrap.log" >&2; die "debootstrap failed"; }
  rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/*   # not needed in the image
  tar -C "$dir" --numeric-owner -cf "$ROOTFS_TAR.tmp" . && mv "$ROOTFS_TAR.tmp" "$ROOTFS_TAR"
  rm -rf --one-file-system "$dir"
  BUILD_NOTE=" (debootstrap+tar $(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN{printf "%.1f", b-a}') s)"
}

phase_start
imported='' BUILD_NOTE=''
if ! docker image inspect "$IMAGE" >/dev/null 2>&1; then
  imported=1
  [ -s "$ROOTFS_TAR" ] || build_rootfs   # the cached tarball skips debootstrap
  log "importing $IMAGE from $ROOTFS_TAR"
  docker import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' - "$IMAGE" <"$ROOTFS_TAR" >/dev/null
fi
# Always verify (about a second): a wrong image must fail here, not in the tests.
out=$(docker run --rm --network none "$IMAGE" sh -c 'python3 --version && python3 -m pip --version' 2>&1) || true
if ! grep -q '^Python 3\.11\.' <<<"$out" || ! grep -q '^pip ' <<<"$out"; then
  docker rmi -f "$IMAGE" >/dev/null 2>&1 || true   # next run re-imports / rebuilds
  [ -z "$imported" ] || rm -f "$ROOTFS_TAR"
  die "$IMAGE lacks Python 3.11 or pip: $out"
fi
phase_end image

# ---- 5. summary ---------------------------------------------------------------------
read -r img_id img_size < <(docker image inspect -f '{{.Id}} {{.Size}}' "$IMAGE")
cat <<EOF
stepflow services ready (state: $STATE)
  dockerd:   $(docker version -f '{{.Server.Version}}') (storage driver $(docker info -f '{{.Driver}}'))
  registry:  http://$REGISTRY
  image:     $IMAGE $img_id ($((img_size / 1000000)) MB), $(head -1 <<<"$out")
  seconds:   packages ${TIMES[packages]}, dockerd ${TIMES[dockerd]}, registry ${TIMES[registry]}, image ${TIMES[image]}$BUILD_NOTE
EOF
