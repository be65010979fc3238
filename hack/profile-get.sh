#!/usr/bin/env bash
# Where a `secret.get` spends its CPU: `claw-secrets dev` (release) under benches/http.rs at
# BENCH_CONNECTIONS (default 24) connections, `perf record --call-graph dwarf` of the server for
# PERF_SECONDS (default 4) in the middle of the run, each sample attributed to a stage by
# hack/perf-stages.py, and the server's CPU per request over the same window (from
# /proc/PID/stat and the audit log's growth: one record per answered read).
#
#   hack/profile-get.sh [OUT_DIR]
#   CLAW_BIN=target/bench-ab/claw-secrets-<rev> hack/profile-get.sh OUT_DIR   (another build)
#
# Needs perf (Debian's linux-perf) and python3. Prints the stage table and the per-request
# figures; leaves perf.data and the per-stage sample counts in OUT_DIR (default target/profile-get).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/profile-get}
conns=${BENCH_CONNECTIONS:-24}
perf_seconds=${PERF_SECONDS:-4}
mkdir -p "$out"
bin=${CLAW_BIN:-}
if [ -z "$bin" ]; then
  cargo build --release --locked --bin claw-secrets >&2
  bin=target/release/claw-secrets
fi
# The load generator: any build of benches/http.rs (HTTP_BENCH), by default the tree's.
bench=${HTTP_BENCH:-$(cargo bench --bench http --no-run --locked 2>&1 | sed -n 's/.*Executable .*(\(.*\))/\1/p' | tail -n 1)}

data=$(mktemp -d "$PWD/$out/data.XXXXXX")
XDG_CONFIG_HOME=$data/config RUST_LOG=warn "$bin" dev --data-dir "$data/d" \
  --listen 127.0.0.1:0 --node-id bench >"$data/server.out" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true' EXIT
addr=
for _ in $(seq 1 200); do
  addr=$(sed -n 's#.*listening on http://\([0-9.:]*\).*#\1#p' "$data/server.out" | head -n 1)
  [ -n "$addr" ] && break
  sleep 0.05
done
[ -n "$addr" ] || { cat "$data/server.out" >&2; exit 1; }

BENCH_ADDR=$addr BENCH_DATA_DIR=$data/d BENCH_CONNECTIONS=$conns BENCH_TRANSPORTS=http \
  BENCH_WARMUP_SECONDS=3 BENCH_SECONDS=$((perf_seconds + 6)) "$bench" --bench >"$out/bench.txt" 2>&1 &
bench_pid=$!
sleep 5

cpu_ticks() { awk '{print $14 + $15}' "/proc/$pid/stat"; }
records() { wc -l <"$data/d/audit.log"; }
threads() { for t in /proc/$pid/task/*; do echo "$(cat "$t/comm") $(awk '{print $14 + $15}' "$t/stat")"; done; }
t0=$(cpu_ticks); r0=$(records); threads >"$out/threads.0"; s0=$(date +%s.%N)
perf record -q -F 499 --call-graph dwarf,16384 -o "$out/perf.data" -p "$pid" -- sleep "$perf_seconds" 2>/dev/null
t1=$(cpu_ticks); r1=$(records); threads >"$out/threads.1"; s1=$(date +%s.%N)
wait $bench_pid
hz=$(getconf CLK_TCK)
python3 - "$t0" "$t1" "$r0" "$r1" "$s0" "$s1" "$hz" "$out" <<'PY'
import sys, collections
t0, t1, r0, r1, s0, s1, hz, out = sys.argv[1:]
t0, t1, r0, r1, hz = int(t0), int(t1), int(r0), int(r1), int(hz)
secs = float(s1) - float(s0)
reads = r1 - r0
print(f"window {secs:.1f} s: {reads} audited reads, {reads / secs:,.0f} req/s (slowed by perf)")
print(f"server CPU {(t1 - t0) / hz / secs:.2f} cores, {(t1 - t0) / hz * 1e6 / reads:.1f} us per read")
by = collections.Counter()
for name, path in (("0", f"{out}/threads.0"), ("1", f"{out}/threads.1")):
    for line in open(path):
        comm, ticks = line.rsplit(" ", 1)
        by[comm] += int(ticks) * (1 if name == "1" else -1)
for comm, ticks in by.most_common():
    if ticks > 0:
        print(f"  thread {comm:<16} {ticks / hz * 1e6 / reads:6.1f} us per read")
PY
perf script -i "$out/perf.data" -F comm,tid,ip,sym,dso 2>/dev/null | python3 hack/perf-stages.py | tee "$out/stages.txt"
echo "bench (under perf, slower than a clean run):"
grep -E "req/s|p99|audit" "$out/bench.txt" | head -5
