-- sluicegate: adjust counters charged by an earlier admission (settle or release).
--
-- Only the window that was charged is touched: a sliding bucket that has been evicted, or
-- a quota key that has expired, is left alone (never re-created without its TTL).
-- Counters never go below zero. A sliding counter's sum (field "-1", see admit.lua) moves
-- with its bucket, and "reserved" comes off the bucket's amount in flight ("p<slot>",
-- admit.lua), which is deleted at zero.
--
-- A quota's reservation comes off its held key (admit.lua) as an adjustment of its own, kind
-- "h": the field of its minute of admission ("slot"), deleted at zero, never re-created.
--
-- A replayed quota adjustment (limits/redis_store.py: one that failed while Redis was
-- unreachable, sent again later) comes after a guard, kind "g": its key is the quota's origin
-- key (admit.lua) and its slot the epoch ms when its admission ran, on the script's clock
-- (admit.lua's `now`). The next adjustment is skipped when the quota key was created after
-- that (the origin's "created", same clock: Redis lost the key since, before or after the
-- adjustment failed; the new key never held the admission's estimate, and its seed from the
-- ledger already counts the request's real usage). An origin without "created" (written by
-- an earlier version) does not skip.
--
-- KEYS[i]  one key per adjustment
-- then 4 values per adjustment i, from ARGV[1 + (i-1)*4]: kind ("s" | "f" | "h" | "g"),
-- slot, delta, reserved (what the settled admission reserved in the bucket or minute; 0 for
-- "f" and "g")

local skip = false
for i = 1, #KEYS do
  local base = 1 + (i - 1) * 4
  local kind = ARGV[base]
  local field = ARGV[base + 1]
  local delta = tonumber(ARGV[base + 2])
  local reserved = tonumber(ARGV[base + 3])
  if skip then
    skip = false
  elseif kind == "g" then
    local created = tonumber(redis.call("HGET", KEYS[i], "created"))
    skip = created ~= nil and created > tonumber(field)
  elseif kind == "s" then
    -- One read and one write (and a delete when the bucket's last reservation in flight
    -- settles), not a call per field: a settle follows every admission.
    local held_field = "p" .. field
    local found = redis.call("HMGET", KEYS[i], field, "-1", held_field)
    local old = tonumber(found[1])
    if old ~= nil then
      local new = math.max(old + delta, 0)
      local writes = {field, new}
      -- The buckets' sum (admit.lua), when the hash has one: the next admission counts
      -- the buckets afresh if not (a hash without "-1" has no "-2" either).
      local sum = tonumber(found[2])
      if sum ~= nil then
        writes[#writes + 1] = "-1"
        writes[#writes + 1] = sum + new - old
      end
      -- Only while the bucket lives: an evicted bucket took its amount in flight along.
      local delete_held = false
      if reserved > 0 then
        local held = (tonumber(found[3]) or 0) - reserved
        if held > 0 then
          writes[#writes + 1] = held_field
          writes[#writes + 1] = held
        elseif found[3] then
          delete_held = true
        end
      end
      redis.call("HSET", KEYS[i], unpack(writes))
      if delete_held then
        redis.call("HDEL", KEYS[i], held_field)
      end
    end
  elseif kind == "h" then
    local held = tonumber(redis.call("HGET", KEYS[i], field))
    if held ~= nil then
      if held > reserved then
        redis.call("HSET", KEYS[i], field, held - reserved)
      else
        redis.call("HDEL", KEYS[i], field)
      end
    end
  elseif redis.call("EXISTS", KEYS[i]) == 1 then
    local value = redis.call("INCRBY", KEYS[i], delta)
    if value < 0 then
      redis.call("SET", KEYS[i], 0, "KEEPTTL")
    end
  end
end
return #KEYS
