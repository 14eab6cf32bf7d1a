-- sluicegate: check and charge several limit counters atomically, all or none.
--
-- Why our own script and not the `limits` package: its moving-window script keeps one list
-- entry per unit of cost, so a 1,000,000 tokens-per-minute limit would become a
-- million-entry list. Here a sliding counter is one hash of at most window/bucket fields
-- (bucket index -> amount) and two of bookkeeping ("-1": the buckets' sum, "-2": the index
-- below which all are deleted), and a quota is one integer key per period: constant memory
-- and, while requests are admitted, constant work per counter key, whatever the limit. The maths is the same as sluicegate/limits/memory.py
-- (see sluicegate/limits/store.py); the conformance tests run both.
--
-- In flight: a sliding counter of kind "r" (its cost is a reservation, settled later by
-- adjust.lua) also keeps, in field "p<bucket index>", how much of that bucket is reserved by
-- admissions not yet settled. The field leaves with its bucket, and adjust.lua takes a
-- settled reservation off it (deleting it at zero), so the hash holds one only per bucket
-- with requests in progress. A refusal reports the live buckets' total (sluicegate/limits/
-- store.py: CounterState.pending).
--
-- In flight, quotas: a quota whose cost is a reservation names a hash of its own among the
-- keys (its "held" key, KEYS[held]), minute of admission -> the amount reserved and not yet
-- settled (adjust.lua takes settled reservations off, deleting a field at zero). Only the
-- last held_n minutes count as in flight; older fields (settles that were lost) are deleted
-- when a minute's field is created and when a refusal reads the hash. Its TTL is
-- (held_n + 1) minutes from the last reservation.
--
-- Origin, quotas: when an admission creates a quota key (it did not exist: a new period,
-- or Redis lost it: a restart without persistence, an eviction, a FLUSH), the same call
-- records the creation in the quota's origin key (KEYS[origin], a hash): field "since" =
-- ARGV[6], the creating request's arrival on the gateway's clock (the ledger's "ts": the
-- seed counts the records before it, and this request is in the counter already), field
-- "created" = this script's `now` (Redis's or the gateway's clock, ARGV[5]: the clock of the
-- admission times the gateway keeps, for adjust.lua's replay guard), and no field "seeded"
-- (limits/lua/seed.lua adds the ledger's earlier usage once and sets it). Same expiry as the quota key. The reply's first value is then 2 instead of 1,
-- and says which counters were created (below), so that the gateway can seed them.
--
-- Every key the script writes has a TTL when it returns, admitted or refused (window +
-- bucket for a sliding counter, the period's end + grace for a quota): no key outlives its
-- counter.
--
-- Time: ARGV[5] says whose clock the windows run on. "r" (production): Redis's own (TIME),
-- one clock for every gateway instance, so that a skewed instance can neither drop the
-- others' buckets early nor keep them late. "g": the caller's (ARGV[1], epoch ms of the
-- gateway's injected clock), deterministic, so that the window maths is tested with a fake
-- clock against the in-memory store. Either way a quota's period, its end (end_ms) and so its
-- TTL and wait are the gateway's (it names the period in the key), as is an origin's
-- "since" (compared with the ledger's times, limits/seeding.py). The reply ends with Redis's
-- time, so that the gateway can measure its skew (limits/redis_store.py).
--
-- KEYS[i]  one key per counter (distinct), i = 1..n; then the quotas' held and origin keys
-- ARGV[1]  now_ms
-- ARGV[2]  grace_ms: how long a fixed (quota) counter outlives its period
-- ARGV[3]  held_ms: a quota's minute of reservations in flight (60000)
-- ARGV[4]  held_n: how many of those minutes count as in flight
-- ARGV[5]  "r": the windows run on Redis's clock; "g": on the caller's (now_ms)
-- ARGV[6]  arrived_ms: when the request arrived (the gateway's clock), a created quota's "since"
-- then 6 values per counter i, from ARGV[7 + (i-1)*6]:
--   kind ("s" sliding | "r" sliding, the cost a reservation | "f" fixed), limit, cost,
--   sliding: window_ms, bucket_ms, 0
--   fixed:   end_ms, held (the index in KEYS of its held key; 0: the cost is no reservation),
--            origin (the index in KEYS of its origin key; 0: none kept)
--
-- Returns {allowed, used_1..used_n, retry_1..retry_n, slot_1..slot_n}, and when refused
-- (allowed = 0) pending_1..pending_n after them; when admitted creating a quota key
-- (allowed = 2) created_1..created_n after them (1: this call created counter i's key):
--   used:    count after the charge when allowed, else the count found
--   retry:   0 = room, -1 = cost exceeds the whole limit, else ms until buckets free room
--   slot:    bucket index charged (sliding), minute of admission (fixed with a held key)
--            or 0 (fixed)
--   pending: for a counter with reservations refused with a wait, its amounts in flight
--            (reserved, not settled: the live buckets', the last held_n minutes'); else 0
-- and, last, Redis's time (epoch ms) when the script ran.

local gateway_now = tonumber(ARGV[1])
local grace = tonumber(ARGV[2])
local held_ms = tonumber(ARGV[3])
local held_n = tonumber(ARGV[4])
-- Allowed among writes: Redis 5+ replicates a script by its effects (7+ only so).
local clock = redis.call("TIME")
local redis_now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local now = gateway_now
if ARGV[5] == "r" then
  now = redis_now
end
local n = (#ARGV - 6) / 6
local used, retry, slot, kinds, costs, ttls, pending = {}, {}, {}, {}, {}, {}, {}
local helds = {}  -- a quota's held key, when its cost is a reservation
local origins = {}  -- a quota's origin key, when kept; absent (its key did not exist)
local created = {}  -- counters whose key this call creates
local wrote = {}  -- counters whose hash this call wrote before deciding (see the refusal)
local allowed = 1

-- A quota's amounts in flight of the minutes from `oldest` on; fields of older minutes
-- (reservations whose settle was lost) are deleted.
local function held_since(key, oldest)
  local flat = redis.call("HGETALL", key)
  local total = 0
  local dead = {}
  for j = 1, #flat, 2 do
    local index = tonumber(flat[j])
    if index ~= nil and index >= oldest then
      total = total + tonumber(flat[j + 1])
    else
      dead[#dead + 1] = flat[j]
    end
  end
  if #dead > 0 then
    redis.call("HDEL", key, unpack(dead))
  end
  return total
end

for i = 1, n do
  local base = 7 + (i - 1) * 6
  local kind = ARGV[base]
  local limit = tonumber(ARGV[base + 1])
  local cost = tonumber(ARGV[base + 2])
  local need = math.max(cost, 1)
  kinds[i] = kind
  costs[i] = cost
  pending[i] = 0
  if kind == "s" or kind == "r" then
    local window = tonumber(ARGV[base + 3])
    local bucket = tonumber(ARGV[base + 4])
    local nb = math.floor(window / bucket)
    local current = math.floor(now / bucket)
    local oldest = current - nb + 1
    local key = KEYS[i]
    -- The hash keeps its buckets' sum in field "-1" and, in "-2", the index below which
    -- every bucket has been deleted: a call reads two fields and deletes the buckets that
    -- left the window since the last one (usually none or one), instead of reading and
    -- summing every bucket (61 for a minute of one-second buckets; that was ~75 µs of
    -- Redis's CPU per call). Negative fields cannot be buckets (indices of epoch time).
    local meta = redis.call("HMGET", key, "-1", "-2")
    local total, evicted = tonumber(meta[1]), tonumber(meta[2])
    local dead = nil  -- buckets to delete, when the window moved or the sum is counted afresh
    if total == nil or evicted == nil or oldest - evicted > 2 * nb + 2 then
      -- No sum yet (a new key, or one written without it): count the buckets once. (An
      -- idle key expires after window + bucket, so the gap to evict is at most ~nb.)
      total = 0
      local flat = redis.call("HGETALL", key)
      dead = {}
      for j = 1, #flat, 2 do
        local index = tonumber(flat[j])
        if index ~= nil and index >= 0 then
          if index < oldest then
            dead[#dead + 1] = flat[j]
          else
            total = total + tonumber(flat[j + 1])
          end
        elseif string.byte(flat[j], 1) == 112 then  -- "p<index>": a bucket's amount in flight
          local of = tonumber(string.sub(flat[j], 2))
          if of ~= nil and of < oldest then
            dead[#dead + 1] = flat[j]
          end
        end
      end
    elseif evicted < oldest then
      local fields = {}
      for index = evicted, oldest - 1 do
        fields[#fields + 1] = string.format("%d", index)
      end
      local amounts = redis.call("HMGET", key, unpack(fields))
      dead = {}
      for j = 1, #fields do
        if amounts[j] then
          total = total - tonumber(amounts[j])
          dead[#dead + 1] = fields[j]
          dead[#dead + 1] = "p" .. fields[j]  -- its amount in flight, if any, goes with it
        end
      end
    end
    if dead ~= nil then
      if #dead > 0 then
        redis.call("HDEL", key, unpack(dead))
      end
      redis.call("HSET", key, "-1", total, "-2", oldest)
      wrote[i] = true
    end
    local live = nil
    if total + need > limit and need <= limit then
      -- About to refuse: count the buckets themselves, for when there will be room (the
      -- rare path). The count also corrects the sum, should it have drifted (an earlier
      -- version settling a bucket without it, in a rolling upgrade): a refusal is always
      -- decided on the buckets.
      local flat = redis.call("HGETALL", key)
      local counted = 0
      local held = 0
      live = {}
      for j = 1, #flat, 2 do
        local index = tonumber(flat[j])
        if index ~= nil and index >= oldest then
          local amount = tonumber(flat[j + 1])
          counted = counted + amount
          live[#live + 1] = {index, amount}
        elseif index == nil and string.byte(flat[j], 1) == 112 then
          local of = tonumber(string.sub(flat[j], 2))
          if of ~= nil and of >= oldest then
            held = held + tonumber(flat[j + 1])
          end
        end
      end
      pending[i] = held
      if counted ~= total then
        total = counted
        redis.call("HSET", key, "-1", total)
        wrote[i] = true
      end
    end
    used[i] = total
    slot[i] = current
    ttls[i] = window + bucket
    if total + need <= limit then
      retry[i] = 0
    elseif need > limit then
      retry[i] = -1
    else
      table.sort(live, function(a, b) return a[1] < b[1] end)
      local excess = total + need - limit
      local freed = 0
      retry[i] = -1
      for _, entry in ipairs(live) do
        freed = freed + entry[2]
        if freed >= excess then
          retry[i] = (entry[1] + nb) * bucket - now
          break
        end
      end
    end
  else
    local end_ms = tonumber(ARGV[base + 3])
    local held = tonumber(ARGV[base + 4])
    local origin = tonumber(ARGV[base + 5])
    local found = redis.call("GET", KEYS[i])
    local total = tonumber(found or "0")
    if not found and origin > 0 then
      origins[i] = KEYS[origin]
    end
    used[i] = total
    slot[i] = 0
    if held > 0 then
      helds[i] = KEYS[held]
      slot[i] = math.floor(now / held_ms)
    end
    -- The gateway's period, so the gateway's time (the Time note above): its end is after
    -- gateway_now, so a refusal's wait is never 0 (which would read as room).
    ttls[i] = math.max(end_ms + grace - gateway_now, 1)
    if total + need <= limit then
      retry[i] = 0
    elseif need > limit then
      retry[i] = -1
    else
      retry[i] = math.max(end_ms - gateway_now, 1)
      if held > 0 and retry[i] > 0 then
        pending[i] = held_since(helds[i], slot[i] - held_n + 1)
      end
    end
  end
  if retry[i] ~= 0 then
    allowed = 0
  end
end

if allowed == 1 then
  for i = 1, n do
    if kinds[i] ~= "f" then
      -- A zero cost still creates its bucket, so that a later settle lands.
      used[i] = used[i] + costs[i]
      local field = string.format("%d", slot[i])
      redis.call("HINCRBY", KEYS[i], field, costs[i])
      redis.call("HINCRBY", KEYS[i], "-1", costs[i])
      if kinds[i] == "r" and costs[i] > 0 then
        redis.call("HINCRBY", KEYS[i], "p" .. field, costs[i])
      end
      redis.call("PEXPIRE", KEYS[i], ttls[i])
    else
      used[i] = tonumber(redis.call("INCRBY", KEYS[i], costs[i]))
      -- Relative to the gateway's clock (its period), not Redis's own.
      redis.call("PEXPIRE", KEYS[i], ttls[i])
      local origin = origins[i]
      if origin ~= nil then
        -- Created now: a fresh origin (an old one, left by a lost key, had its own "since"
        -- and perhaps "seeded").
        redis.call("DEL", origin)
        redis.call("HSET", origin, "since", ARGV[6], "created", string.format("%d", now))
        redis.call("PEXPIRE", origin, ttls[i])
        created[i] = 1
        allowed = 2
      end
      local held = helds[i]
      if held ~= nil and costs[i] > 0 then
        local field = string.format("%d", slot[i])
        if redis.call("HINCRBY", held, field, costs[i]) == costs[i] then
          -- The minute's first reservation in flight (about once a minute): drop the
          -- fields too old to count, so that the hash stays small.
          held_since(held, slot[i] - held_n + 1)
        end
        redis.call("PEXPIRE", held, (held_n + 1) * held_ms)
      end
    end
  end
else
  -- A refusal charges nothing, but the bookkeeping above may have written a hash that had
  -- no TTL: a new or expired key is created by that HSET. Without one it would never
  -- expire (a client refused for good, say over its quota or asking for more than a limit,
  -- would leave a key per counter for ever). Only here, on the rarer path: an admission
  -- sets every TTL anyway. Quota keys are only read on a refusal.
  for i = 1, n do
    if wrote[i] then
      redis.call("PEXPIRE", KEYS[i], ttls[i])
    end
  end
end

local reply = {allowed}
for i = 1, n do reply[#reply + 1] = used[i] end
for i = 1, n do reply[#reply + 1] = retry[i] end
for i = 1, n do reply[#reply + 1] = slot[i] end
if allowed == 0 then
  for i = 1, n do reply[#reply + 1] = pending[i] end
elseif allowed == 2 then
  for i = 1, n do reply[#reply + 1] = created[i] or 0 end
end
reply[#reply + 1] = redis_now
return reply
