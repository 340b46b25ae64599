-- wrk script: POST pre-built Open Inference Protocol bodies to DYNFUSE_BENCH_PATH, rotating, and one JSON line of
-- results at the end (as wrk_classify.lua). The file named by DYNFUSE_BENCH_BODIES holds records of
-- "<json length> <body length>\n" then the body's bytes: a json length of 0 is a JSON body, any other a body of the
-- binary tensor data extension (the JSON, then the tensors' bytes), sent with Inference-Header-Content-Length.
local bodies = {}
local file = assert(io.open(os.getenv("DYNFUSE_BENCH_BODIES"), "rb"))
while true do
  local line = file:read("*l")
  if not line then break end
  local header_length, length = line:match("^(%d+) (%d+)$")
  local headers = { ["Content-Type"] = "application/json" }
  if tonumber(header_length) > 0 then
    headers = { ["Content-Type"] = "application/octet-stream", ["Inference-Header-Content-Length"] = header_length }
  end
  bodies[#bodies + 1] = { headers = headers, body = file:read(tonumber(length)) }
end
file:close()
local path = os.getenv("DYNFUSE_BENCH_PATH")
local next_body = 0

function init(args)
  next_body = math.random(#bodies)  -- threads start at different bodies
end

function request()
  next_body = next_body % #bodies + 1
  return wrk.format("POST", path, bodies[next_body].headers, bodies[next_body].body)
end

function response(status, headers, body)
  if status ~= 200 then
    io.stderr:write("status " .. status .. ": " .. body:sub(1, 200) .. "\n")
  end
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
