-- sluicegate: add a quota counter's seed (its usage before the counter was created, from
-- the ledger: limits/seeding.py) once, atomically.
--
-- Several gateway instances may compute the same seed at once: only the first call whose
-- counter still has the origin the seed was computed for adds it. A counter lost and
-- created again meanwhile has a new "since" (admit.lua), so a seed computed for the old one
-- is refused (the new one gets its own). Sets "seeded" (to the seed) on the origin key,
-- which keeps its TTL (the quota key's); INCRBY keeps the quota key's.
--
-- KEYS[1]  the quota key
-- KEYS[2]  its origin key (admit.lua)
-- ARGV[1]  since: the origin's "since" the seed was computed for
-- ARGV[2]  the seed (tokens, >= 0)
--
-- Returns 1 when this call applied the seed, 0 otherwise.

local origin = redis.call("HMGET", KEYS[2], "since", "seeded")
if origin[1] ~= ARGV[1] or origin[2] then
  return 0
end
if redis.call("EXISTS", KEYS[1]) == 0 then
  return 0
end
local seed = tonumber(ARGV[2])
if seed > 0 then
  redis.call("INCRBY", KEYS[1], seed)
end
redis.call("HSET", KEYS[2], "seeded", seed)
return 1
