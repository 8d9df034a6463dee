-- KEYS[1] account hash, KEYS[2] its holds hash (same hash tag); ARGV hold_id, want_fen, and a
-- ledger balance_fen and seq to install first (install.lua), or '' and '' to install nothing.
-- Holds up to want of what is available; returns the amount held, or -1 if the account is not
-- loaded. A repeated reserve of the same hold returns what it holds.
-- On a single server also KEYS[3], the lease index, with ARGV lease_end_ms and the hold's index
-- member: the hold is indexed and, if nothing is held, unindexed in this same step. (On a cluster
-- the index lives on another slot, and the caller indexes before and unindexes after.)
if ARGV[4] ~= '' then install(KEYS[1], ARGV[3], ARGV[4]) end
local index = KEYS[3]
if index then redis.call('ZADD', index, ARGV[5], ARGV[6]) end
local balance = redis.call('HGET', KEYS[1], 'b')
if not balance then
  -- (A hold of this id may outlive its account's hash, should that ever be evicted: it stays indexed.)
  if index and redis.call('HEXISTS', KEYS[2], ARGV[1]) == 0 then redis.call('ZREM', index, ARGV[6]) end
  return -1
end
local existing = redis.call('HGET', KEYS[2], ARGV[1])
if existing then return tonumber(existing) end
local held = 0
for _, amount in ipairs(redis.call('HVALS', KEYS[2])) do held = held + tonumber(amount) end
local available = tonumber(balance) - held
if available < 0 then available = 0 end
local take = math.min(tonumber(ARGV[2]), available)
if take > 0 then
  redis.call('HSET', KEYS[2], ARGV[1], take)
elseif index then
  redis.call('ZREM', index, ARGV[6])
end
return take
