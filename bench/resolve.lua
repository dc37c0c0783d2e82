-- wrk script for bench/server.sh: GET $BENCH_PATH?arch=amd64&current=<digest>&nonce=<fresh>
-- with `Authorization: Bearer <token>`, cycling through the device tokens in
-- $BENCH_TOKENS (one a line) and the digests in $BENCH_DIGESTS (comma-separated).
-- The ceiling run sends the very same requests to bench/ceiling, which
-- answers any path. At the end it prints one line:
-- BENCH {"rps":..,"p50_ms":..,"p99_ms":..,"bytes":<per answer, headers included>,...}.

local path = os.getenv("BENCH_PATH")
local tokens_file = os.getenv("BENCH_TOKENS")
local salt = os.getenv("BENCH_SALT") or tostring(os.time())
-- BENCH_CLOSE=1: a new connection for every request, as a device polling
-- every few minutes opens (its idle connection is long closed by then).
local close = os.getenv("BENCH_CLOSE") == "1"
-- BENCH_DELAY_MS=N: each connection waits N ms after an answer before it
-- asks again, so the load is a fixed rate (about connections / N per ms)
-- rather than as fast as the server answers; latency is then read at that
-- rate instead of at saturation.
local delay_ms = tonumber(os.getenv("BENCH_DELAY_MS") or "")
if delay_ms then
  function delay() return delay_ms end
end
local digests = {}
for d in string.gmatch(os.getenv("BENCH_DIGESTS") or "", "[^,]+") do
  digests[#digests + 1] = d
end

local threads = 0
function setup(thread)
  thread:set("tid", threads)
  threads = threads + 1
end

local tokens = {}
local counter = 0
function init(args)
  for line in io.lines(tokens_file) do
    if #line > 0 then tokens[#tokens + 1] = line end
  end
  -- Threads start half a file apart, so they do not send the same device together.
  counter = (tid or 0) * math.floor(#tokens / 2)
end

function request()
  counter = counter + 1
  local token = tokens[(counter % #tokens) + 1]
  local current = digests[(math.floor(counter / 7) % #digests) + 1]
  local nonce = string.format("n%s-%d-%d", salt, tid or 0, counter)
  local headers = { ["Authorization"] = "Bearer " .. token }
  if close then headers["Connection"] = "close" end
  return wrk.format("GET", path .. "?arch=amd64&current=" .. current .. "&nonce=" .. nonce, headers)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH {"rps":%.1f,"p50_ms":%.3f,"p99_ms":%.3f,"max_ms":%.3f,"requests":%d,"non2xx":%d,"socket_errors":%d,"bytes":%.1f}\n',
    summary.requests / (summary.duration / 1e6),
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, latency.max / 1000,
    summary.requests, e.status, e.connect + e.read + e.write + e.timeout,
    summary.bytes / math.max(summary.requests, 1)))
end
