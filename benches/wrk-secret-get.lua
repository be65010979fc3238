-- Cross-check of benches/http.rs with wrk (not needed by CI; `apt-get install wrk`).
--
--   TOKEN=$(cat "$DATA_DIR/admin.token") \
--     wrk -t1 -c32 -d10s --latency -s benches/wrk-secret-get.lua http://127.0.0.1:7070
--
-- against `claw-secrets dev --data-dir "$DATA_DIR"` holding a secret named bench.secret
-- (running `cargo bench --bench http` with BENCH_ADDR and BENCH_DATA_DIR set creates it).
-- Prints the usual wrk figures, the p99.9, and how many answers were not HTTP 200 with
-- "ok":true.

wrk.method = "POST"
wrk.path = "/v1/invoke"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. assert(os.getenv("TOKEN"), "set TOKEN")
wrk.body = '{"nodeId":"local","command":"secret.get","params":{"name":"bench.secret"}}'

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  bad = 0
end

function response(status, headers, body)
  if status ~= 200 or not body:find('"ok":true', 1, true) then
    bad = bad + 1
  end
end

function done(summary, latency, requests)
  local total = 0
  for _, t in ipairs(threads) do
    total = total + t:get("bad")
  end
  io.write(string.format("p99.9 latency: %.3f ms\n", latency:percentile(99.9) / 1000))
  io.write(string.format("answers not 200 with \"ok\":true: %d\n", total))
end
