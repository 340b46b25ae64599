-- wrk script: POST real test-split bodies (one JSON body per line of the file named by DYNFUSE_BENCH_BODIES),
-- rotating, to DYNFUSE_BENCH_PATH (default /v1/classify), and one JSON line of results at the end (latencies
-- in microseconds).
local bodies = {}
for line in io.lines(os.getenv("DYNFUSE_BENCH_BODIES")) do
  bodies[#bodies + 1] = line
end
local headers = { ["Content-Type"] = "application/json" }
local path = os.getenv("DYNFUSE_BENCH_PATH") or "/v1/classify"
local next_body = 0

function init(args)
  next_body = math.random(#bodies)  -- threads start at different bodies
end

function request()
  next_body = next_body % #bodies + 1
  return wrk.format("POST", path, headers, bodies[next_body])
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'JSON {"generator": "wrk", "requests": %d, "duration_s": %.6f, "bytes_read": %d, ' ..
    '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, ' ..
    '"latency_ms": {"mean": %.3f, "p50": %.3f, "p95": %.3f, "p99": %.3f, "max": %.3f}}\n',
    summary.requests, summary.duration / 1e6, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean / 1e3, latency:percentile(50) / 1e3, latency:percentile(95) / 1e3,
    latency:percentile(99) / 1e3, latency.max / 1e3))
end
