#!/usr/bin/env bash
# Before and after, in one run: benches/http.rs against `claw-secrets dev` built from BASE (a
# commit) and from the working tree, alternating, on the same machine within minutes, so the
# ratio means something even where the absolute figures drift with the machine's load.
#
#   hack/bench-ab.sh BASE [ROUNDS]
#
# Environment (passed through to the bench): BENCH_CONNECTIONS (default 16,24), BENCH_SECONDS,
# BENCH_WARMUP_SECONDS. BENCH_COMMANDS: what to run, default "get rotate". BASE_BIN: an already
# built `claw-secrets` of BASE (skips building it). Data dirs are made under target/bench-ab/,
# on the same disk as a default run. Prints each run's summary lines, labelled.
set -euo pipefail
cd "$(dirname "$0")/.."

base=${1:?usage: hack/bench-ab.sh BASE [ROUNDS]}
rounds=${2:-2}
commands=${BENCH_COMMANDS:-get rotate}
export BENCH_CONNECTIONS=${BENCH_CONNECTIONS:-16,24}
work=$PWD/target/bench-ab
mkdir -p "$work"

rev=$(git rev-parse --short "$base")
base_bin=${BASE_BIN:-$work/claw-secrets-$rev}
if [ ! -x "$base_bin" ]; then
  echo "== building $rev (release) ==" >&2
  src=$work/src-$rev
  rm -rf "$src"
  git worktree add --detach "$src" "$rev" >/dev/null
  (cd "$src" && CARGO_TARGET_DIR="$work/target-base" cargo build --release --locked --bin claw-secrets)
  cp "$work/target-base/release/claw-secrets" "$base_bin"
  git worktree remove --force "$src"
fi
echo "== building the working tree (release) and the bench ==" >&2
cargo build --release --locked --bin claw-secrets
cargo bench --bench http --no-run --locked 2>/dev/null
head_bin=$PWD/target/release/claw-secrets

pid=
stop() { if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; pid=; fi; }
trap stop EXIT

# Starts `$1 dev` on a fresh data dir; sets $pid, $addr and $dir.
start() {
  dir=$(mktemp -d "$work/data.XXXXXX")
  local out=$dir.out
  XDG_CONFIG_HOME=$dir/config RUST_LOG=warn "$1" dev --data-dir "$dir/data" --listen 127.0.0.1:0 \
    --node-id bench >"$out" 2>&1 &
  pid=$!
  for _ in $(seq 1 200); do
    addr=$(sed -n 's#.*listening on http://\([0-9.:]*\).*#\1#p' "$out" | head -n 1)
    [ -n "$addr" ] && return 0
    sleep 0.05
  done
  echo "the server did not start:" >&2
  cat "$out" >&2
  return 1
}

for round in $(seq 1 "$rounds"); do
  for side in base head; do
    bin=$base_bin
    label="$rev (base)"
    if [ "$side" = head ]; then
      bin=$head_bin
      label="working tree"
    fi
    for command in $commands; do
      start "$bin"
      echo "== round $round, $label, $command ==" >&2
      BENCH_ADDR=$addr BENCH_DATA_DIR=$dir/data BENCH_COMMAND=$command \
        cargo bench --bench http --locked 2>/dev/null |
        sed -n '/^summary/,$p' | sed "s#^#[round $round | $label | $command] #"
      stop
      rm -rf "$dir" "$dir.out"
    done
  done
done
