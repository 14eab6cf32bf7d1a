-- wrk script: POST a chat completion and report the run as one JSON line.
--
-- Environment (read once per thread):
--   BENCH_BODY_FILE   file holding the JSON request body (required)
--   BENCH_MIX_FILE    optional second body; when set, every BENCH_MIX_EVERY-th request
--                     (default 4) sends it instead (the soak mixes JSON and streams)
--   BENCH_HEADERS     optional extra headers, "name: value" pairs separated by "|"
--
-- done() prints a single line starting with "WRK_JSON " that the harness parses:
-- counts, errors, and latency in microseconds (mean, stdev, min, max, percentiles).

local function read_file(path)
  local f = assert(io.open(path, "rb"), "cannot open " .. tostring(path))
  local data = f:read("*a")
  f:close()
  return data
end

local function headers()
  local h = { ["Content-Type"] = "application/json", ["Accept"] = "application/json" }
  local extra = os.getenv("BENCH_HEADERS") or ""
  for pair in string.gmatch(extra, "[^|]+") do
    local name, value = string.match(pair, "^%s*([^:]+):%s*(.-)%s*$")
    if name then h[name] = value end
  end
  return h
end

wrk.method = "POST"
wrk.body = read_file(os.getenv("BENCH_BODY_FILE"))
wrk.headers = headers()

local mix_file = os.getenv("BENCH_MIX_FILE")
if mix_file and mix_file ~= "" then
  local every = tonumber(os.getenv("BENCH_MIX_EVERY") or "4")
  local plain, mixed, n
  init = function(args)
    plain = wrk.format(nil, nil, nil, wrk.body)
    mixed = wrk.format(nil, nil, nil, read_file(mix_file))
    n = 0
  end
  request = function()
    n = n + 1
    if n % every == 0 then return mixed end
    return plain
  end
end

done = function(summary, latency, requests)
  local e = summary.errors
  local parts = {
    string.format('"requests":%d', summary.requests),
    string.format('"duration_us":%d', summary.duration),
    string.format('"bytes":%d', summary.bytes),
    string.format('"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}',
      e.connect, e.read, e.write, e.status, e.timeout),
    string.format('"latency_us":{"min":%d,"max":%d,"mean":%.1f,"stdev":%.1f',
      latency.min, latency.max, latency.mean, latency.stdev),
  }
  local pct = {}
  for _, p in ipairs({ 50, 75, 90, 99, 99.9 }) do
    pct[#pct + 1] = string.format('"p%s":%d', tostring(p), latency:percentile(p))
  end
  io.write("WRK_JSON {" .. table.concat(parts, ",") .. "," .. table.concat(pct, ",") .. "}}\n")
end
