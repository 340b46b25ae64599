-- wrk script for bench/overload.py: POST /v1/classify with real test-split bodies (one JSON body per line
-- of the file named by DYNFUSE_BENCH_BODIES), rotating; counts answers by status and measures the latency
-- of the SERVED requests (200s) alone. wrk's own latency mixes in the refusals; so each request carries its
-- send time (CLOCK_MONOTONIC, via LuaJIT's FFI) in X-Request-ID, which the server echoes on its 200s, and
-- response() takes the difference. One JSON line at the end (latencies in milliseconds).
local ffi = require("ffi")
ffi.cdef [[
  typedef struct { long tv_sec; long tv_nsec; } dynfuse_timespec;
  int clock_gettime(int clock_id, dynfuse_timespec *tp);
]]
local clock = ffi.new("dynfuse_timespec")
local function now_us()
  ffi.C.clock_gettime(1, clock) -- CLOCK_MONOTONIC
  return tonumber(clock.tv_sec) * 1000000 + tonumber(clock.tv_nsec) / 1000
end

local bodies = {}
for line in io.lines(os.getenv("DYNFUSE_BENCH_BODIES")) do
  bodies[#bodies + 1] = line
end
local next_body = 0
local threads = {}

-- per thread (each runs its own copy of this script)
statuses = {}
served_us = {}

function setup(thread)
  threads[#threads + 1] = thread
end

function init(args)
  next_body = math.random(#bodies)
end

function request()
  next_body = next_body % #bodies + 1
  local headers = { ["Content-Type"] = "application/json", ["X-Request-ID"] = string.format("t%.0f", now_us()) }
  return wrk.format("POST", "/v1/classify", headers, bodies[next_body])
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
  if status == 200 then
    local sent = headers["X-Request-ID"] or headers["x-request-id"]
    if sent then
      served_us[#served_us + 1] = now_us() - tonumber(sent:sub(2))
    end
  end
end

local function percentile(sorted, q)
  if #sorted == 0 then return -1 end
  local position = (#sorted - 1) * q / 100 + 1
  local low = math.floor(position)
  local high = math.min(low + 1, #sorted)
  return sorted[low] + (sorted[high] - sorted[low]) * (position - low)
end

function done(summary, latency, requests)
  local counts, served = {}, {}
  for _, thread in ipairs(threads) do
    for status, n in pairs(thread:get("statuses")) do
      counts[status] = (counts[status] or 0) + n
    end
    for _, us in ipairs(thread:get("served_us")) do
      served[#served + 1] = us / 1000
    end
  end
  table.sort(served)
  local parts = {}
  for status, n in pairs(counts) do
    parts[#parts + 1] = string.format('"%d": %d', status, n)
  end
  local e = summary.errors
  io.write(string.format(
    'JSON {"generator": "wrk", "requests": %d, "duration_s": %.6f, "statuses": {%s}, ' ..
    '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, ' ..
    '"served_latency_ms": {"n": %d, "p50": %.3f, "p95": %.3f, "p99": %.3f, "max": %.3f}, ' ..
    '"all_latency_ms": {"p50": %.3f, "p99": %.3f, "max": %.3f}}\n',
    summary.requests, summary.duration / 1e6, table.concat(parts, ", "),
    e.connect, e.read, e.write, e.status, e.timeout,
    #served, percentile(served, 50), percentile(served, 95), percentile(served, 99), served[#served] or -1,
    latency:percentile(50) / 1e3, latency:percentile(99) / 1e3, latency.max / 1e3))
end
