-- sluicegate: adjust counters charged by an earlier admission (settle or release).
--
-- Only the window that was charged is touched: a sliding bucket that has been evicted, or
-- a quota key that has expired, is left alone (never re-created without its TTL).
-- Counters never go below zero.
--
-- KEYS[i]  one key per adjustment
-- then 3 values per adjustment i, from ARGV[1 + (i-1)*3]: kind ("s" | "f"), slot, delta

for i = 1, #KEYS do
  local base = 1 + (i - 1) * 3
  local kind = ARGV[base]
  local field = ARGV[base + 1]
  local delta = tonumber(ARGV[base + 2])
  if kind == "s" then
    if redis.call("HEXISTS", KEYS[i], field) == 1 then
      local value = redis.call("HINCRBY", KEYS[i], field, delta)
      if value < 0 then
        redis.call("HSET", KEYS[i], field, 0)
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
