#!/usr/bin/env bash
# Single-node Ceph RGW (S3) for development and tests, listening on 127.0.0.1 only.
#
#   infra/ceph-rgw.sh install        # apt-get install ceph-mon ceph-osd radosgw (skipped when present)
#   infra/ceph-rgw.sh start          # create (first time) and start mon + osd + radosgw, create the S3 user
#   infra/ceph-rgw.sh env            # print `export ...` lines for boto3 / svd-ray / pyarrow clients
#   infra/ceph-rgw.sh status         # exit 0 when every daemon we started is alive and RGW answers
#   infra/ceph-rgw.sh stop           # kill exactly the PIDs recorded by `start`
#   infra/ceph-rgw.sh purge          # stop, then delete the state dir (all data)
#
# State dir: $SVD_RAY_CEPH_DIR (default /tmp/svd-ray-ceph), or `--dir DIR` before the command.
# Layout: ceph.conf, ports.env, keys.env, pids/<daemon>.pid, mon/, osd/ (BlueStore on a sparse file), log/.
# Cluster: 1 mon (msgr v1 on 127.0.0.1), 1 BlueStore OSD, radosgw (beast), auth none, pool size 1, no mgr.
# Ports: chosen free on first start (or SVD_RAY_CEPH_MON_PORT / SVD_RAY_CEPH_RGW_PORT) and kept in ports.env;
# the mon port is baked into the monmap, so a restart reuses it.
set -euo pipefail

DIR="${SVD_RAY_CEPH_DIR:-/tmp/svd-ray-ceph}"
if [[ "${1:-}" == "--dir" ]]; then DIR="$2"; shift 2; fi
CMD="${1:-}"
CONF="$DIR/ceph.conf"
PKGS=(ceph-mon ceph-osd radosgw)
ACCESS_KEY="svdraydevaccesskey01"
SECRET_KEY="svdraydevsecretkey0000000000000000000001"
REGION="us-east-1"

log() { echo "[ceph-rgw] $*" >&2; }
die() { echo "[ceph-rgw] ERROR: $*" >&2; exit 1; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.1f", b-a}'; }

port_in_use() { ss -Htln "sport = :$1" 2>/dev/null | grep -q .; }
free_port() {  # first free port at or after $1
  local p=$1
  while port_in_use "$p"; do p=$((p + 1)); done
  echo "$p"
}

installed() {
  local p
  for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || return 1
  done
}

cmd_install() {
  if installed; then log "packages already installed: ${PKGS[*]}"; return 0; fi
  local t0; t0=$(now)
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # policy-rc.d stops the packages' own services from starting (we run our own daemons).
  local prc=/usr/sbin/policy-rc.d created_prc=0
  if [[ ! -e $prc ]]; then printf '#!/bin/sh\nexit 101\n' > $prc; chmod +x $prc; created_prc=1; fi
  apt-get install -y -qq --no-install-recommends "${PKGS[@]}" >/dev/null
  if [[ $created_prc == 1 ]]; then rm -f $prc; fi
  log "installed ${PKGS[*]} in $(elapsed "$t0") s"
}

pid_alive() {  # pidfile -> 0 when that PID is alive and is a ceph daemon we started
  local f=$1 pid
  [[ -s $f ]] || return 1
  pid=$(cat "$f")
  [[ -d /proc/$pid ]] || return 1
  tr '\0' ' ' < "/proc/$pid/cmdline" | grep -q -- "$CONF"
}

spawn() {  # name, command... : start in the foreground mode (-f) in the background, record its PID
  local name=$1; shift
  setsid "$@" >>"$DIR/log/$name.out" 2>&1 < /dev/null &
  echo $! > "$DIR/pids/$name.pid"
}

wait_for() {  # seconds, description, command...
  local t=$1 what=$2; shift 2
  local end=$(( $(date +%s) + t ))
  until "$@" >/dev/null 2>&1; do
    (( $(date +%s) < end )) || die "timed out after ${t}s waiting for $what (logs: $DIR/log)"
    sleep 0.3
  done
}

ceph_() { timeout 20 ceph -c "$CONF" --connect-timeout 10 "$@"; }

write_conf() {
  cat > "$CONF" <<CONF
[global]
fsid = $FSID
mon_host = v1:127.0.0.1:$MON_PORT
public_network = 127.0.0.1/32
cluster_network = 127.0.0.1/32
ms_bind_msgr2 = false
ms_bind_ipv6 = false
auth_cluster_required = none
auth_service_required = none
auth_client_required = none
auth_allow_insecure_global_id_reclaim = true
osd_pool_default_size = 1
osd_pool_default_min_size = 1
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
osd_pool_default_pg_autoscale_mode = off
mon_allow_pool_size_one = true
mon_warn_on_pool_no_redundancy = false
osd_crush_chooseleaf_type = 0
run_dir = $DIR/run
admin_socket = $DIR/run/\$name.asok
log_file = $DIR/log/\$name.log
log_to_stderr = false
err_to_stderr = true
mon_cluster_log_file = $DIR/log/cluster.log
keyring = $DIR/keyring

mon_data_avail_warn = 1
mon_data_avail_crit = 0

[mon]
mon_data = $DIR/mon/\$name

[mon.a]
public_addr = v1:127.0.0.1:$MON_PORT

[osd]
osd_data = $DIR/osd/\$name
osd_objectstore = bluestore
bluestore_block_path = $DIR/osd/\$name/block.file
bluestore_block_create = true
bluestore_block_size = 10737418240
bluestore_block_db_create = false
bluestore_block_wal_create = false
osd_memory_target = 536870912
bluestore_cache_autotune = false
bluestore_cache_size = 67108864
osd_max_object_name_len = 460
osd_max_object_namespace_len = 64
# Ceph 16 races at OSD boot: its first crush/device-class command can carry a zero fsid ("wrong fsid") and
# the OSD then fails to start. The script places the OSD in CRUSH itself instead.
osd_crush_update_on_start = false
osd_class_update_on_start = false

[client.rgw.dev]
rgw_frontends = beast endpoint=127.0.0.1:$RGW_PORT
rgw_data = $DIR/rgw
rgw_dns_name = 127.0.0.1
rgw_enable_usage_log = false
rgw_thread_pool_size = 64
CONF
}

cmd_start() {
  command -v ceph-mon >/dev/null && command -v radosgw >/dev/null || die "ceph is not installed: run '$0 install' first"
  mkdir -p "$DIR"/{pids,log,run,mon,osd,rgw}
  if pid_alive "$DIR/pids/radosgw.pid"; then log "already running (state $DIR)"; return 0; fi
  local t0; t0=$(now)
  local fresh=0
  if [[ -f $DIR/ports.env ]]; then
    # shellcheck disable=SC1091
    source "$DIR/ports.env"
  else
    fresh=1
    FSID=$(cat /proc/sys/kernel/random/uuid)
    MON_PORT=${SVD_RAY_CEPH_MON_PORT:-$(free_port 16789)}
    RGW_PORT=${SVD_RAY_CEPH_RGW_PORT:-$(free_port 17480)}
    [[ $RGW_PORT != "$MON_PORT" ]] || RGW_PORT=$(free_port $((MON_PORT + 1)))
  fi
  port_in_use "$MON_PORT" && die "mon port $MON_PORT is in use (purge $DIR to pick new ports)"
  port_in_use "$RGW_PORT" && die "rgw port $RGW_PORT is in use (purge $DIR to pick new ports)"
  write_conf

  if [[ $fresh == 1 ]]; then
    log "creating cluster $FSID in $DIR (mon 127.0.0.1:$MON_PORT, rgw 127.0.0.1:$RGW_PORT)"
    : > "$DIR/keyring"
    monmaptool --create --fsid "$FSID" --addv a "[v1:127.0.0.1:$MON_PORT]" "$DIR/monmap" >/dev/null
    ceph-mon -c "$CONF" --mkfs -i a --monmap "$DIR/monmap" >>"$DIR/log/mkfs.out" 2>&1 || die "mon mkfs failed (see $DIR/log)"
  fi
  spawn mon ceph-mon -f -c "$CONF" -i a
  wait_for 30 "mon" ceph_ mon stat

  if [[ $fresh == 1 ]]; then
    local osd_uuid osd_id
    osd_uuid=$(cat /proc/sys/kernel/random/uuid)
    osd_id=$(ceph_ osd new "$osd_uuid")
    [[ $osd_id == 0 ]] || die "unexpected osd id '$osd_id'"
    mkdir -p "$DIR/osd/osd.0"
    ceph-osd -c "$CONF" -i 0 --mkfs --osd-uuid "$osd_uuid" >>"$DIR/log/mkfs.out" 2>&1 || die "osd mkfs failed (see $DIR/log)"
    ceph_ osd crush add osd.0 1.0 root=default host=localhost >>"$DIR/log/mkfs.out" 2>&1 || die "crush add failed"
    printf 'FSID=%s\nMON_PORT=%s\nRGW_PORT=%s\n' "$FSID" "$MON_PORT" "$RGW_PORT" > "$DIR/ports.env"
  fi
  spawn osd ceph-osd -f -c "$CONF" -i 0
  wait_for 60 "osd up" bash -c "timeout 10 ceph -c '$CONF' osd dump 2>/dev/null | grep -q '^osd.0 up'"

  spawn radosgw radosgw -f -c "$CONF" -n client.rgw.dev
  wait_for 90 "radosgw on 127.0.0.1:$RGW_PORT" curl -sf -o /dev/null "http://127.0.0.1:$RGW_PORT/"

  if [[ ! -f $DIR/keys.env ]]; then
    timeout 30 radosgw-admin -c "$CONF" -n client.rgw.dev user create --uid=svd-ray --display-name="svd-ray dev" \
      --access-key="$ACCESS_KEY" --secret-key="$SECRET_KEY" >/dev/null 2>>"$DIR/log/admin.out" \
      || die "radosgw-admin user create failed (see $DIR/log/admin.out)"
    printf 'ACCESS_KEY=%s\nSECRET_KEY=%s\n' "$ACCESS_KEY" "$SECRET_KEY" > "$DIR/keys.env"
  fi
  log "started in $(elapsed "$t0") s: S3 endpoint http://127.0.0.1:$RGW_PORT (state $DIR)"
}

cmd_stop() {
  local name f pid any=0
  for name in radosgw osd mon; do
    f="$DIR/pids/$name.pid"
    if pid_alive "$f"; then
      pid=$(cat "$f"); any=1
      kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 1 100); do [[ -d /proc/$pid ]] || break; sleep 0.1; done
      if [[ -d /proc/$pid ]]; then log "$name ($pid) did not stop; SIGKILL"; kill -KILL "$pid" 2>/dev/null || true; fi
      log "stopped $name ($pid)"
    fi
    rm -f "$f"
  done
  [[ $any == 1 ]] || log "nothing running (state $DIR)"
}

cmd_status() {
  local ok=0 name
  for name in mon osd radosgw; do
    if pid_alive "$DIR/pids/$name.pid"; then echo "$name: running (pid $(cat "$DIR/pids/$name.pid"))"
    else echo "$name: stopped"; ok=1; fi
  done
  if [[ -f $DIR/ports.env ]]; then
    # shellcheck disable=SC1091
    source "$DIR/ports.env"
    if curl -sf -o /dev/null "http://127.0.0.1:$RGW_PORT/"; then echo "s3: http://127.0.0.1:$RGW_PORT answers"
    else echo "s3: http://127.0.0.1:$RGW_PORT not answering"; ok=1; fi
  fi
  return $ok
}

cmd_env() {
  [[ -f $DIR/ports.env && -f $DIR/keys.env ]] || die "no server state in $DIR: run '$0 start' first"
  # shellcheck disable=SC1091
  source "$DIR/ports.env"; source "$DIR/keys.env"
  cat <<ENV
export SVD_RAY_S3_ENDPOINT=http://127.0.0.1:$RGW_PORT
export AWS_ACCESS_KEY_ID=$ACCESS_KEY
export AWS_SECRET_ACCESS_KEY=$SECRET_KEY
export AWS_DEFAULT_REGION=$REGION
export AWS_REQUEST_CHECKSUM_CALCULATION=WHEN_REQUIRED
export AWS_RESPONSE_CHECKSUM_VALIDATION=WHEN_REQUIRED
ENV
}

cmd_purge() {
  cmd_stop
  case "$DIR" in ""|/) die "refusing to delete '$DIR'";; esac
  [[ -f $DIR/ceph.conf || ! -e $DIR ]] || die "$DIR does not look like a ceph-rgw.sh state dir; not deleting"
  rm -rf "$DIR"
  log "deleted $DIR"
}

case "$CMD" in
  install) cmd_install ;;
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  env) cmd_env ;;
  purge) cmd_purge ;;
  *) echo "usage: $0 [--dir STATE_DIR] install|start|stop|status|env|purge" >&2; exit 2 ;;
esac
