-- sluicegate: adjust counters charged by an earlier admission (settle or release).
--
-- Only the window that was charged is touched: a sliding bucket that has been evicted, or
-- a quota key that has expired, is left alone (never re-created without its TTL).
-- Counters never go below zero. A sliding counter's sum (field "-1", see admit.lua) moves
-- with its bucket.
--
-- KEYS[i]  one key per adjustment
-- then 3 values per adjustment i, from ARGV[1 + (i-1)*3]: kind ("s" | "f"), slot, delta

for i = 1, #KEYS do
  local base = 1 + (i - 1) * 3
  local kind = ARGV[base]
  local field = ARGV[base + 1]
  local delta = tonumber(ARGV[base + 2])
  if kind == "s" then
    local old = tonumber(redis.call("HGET", KEYS[i], field))
    if old ~= nil then
      local new = math.max(old + delta, 0)
      redis.call("HSET", KEYS[i], field, new)
      -- The buckets' sum (admit.lua), when the hash has one: the next admission counts
      -- the buckets afresh if not.
      if redis.call("HEXISTS", KEYS[i], "-1") == 1 then
        redis.call("HINCRBY", KEYS[i], "-1", new - old)
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
