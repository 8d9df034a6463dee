-- KEYS[1] account hash, KEYS[2] its holds hash; ARGV, optional: balance_fen, seq read from the
-- ledger, installed first unless the cache has a balance as new or newer (as load.lua does).
-- Returns {balance_fen, seq, held_fen}, or {} when the account is not loaded. Held money is
-- summed from the holds themselves, never a counter that could drift.
if ARGV[2] then
  local seq = redis.call('HGET', KEYS[1], 's')
  if (not seq) or tonumber(seq) < tonumber(ARGV[2]) then
    redis.call('HSET', KEYS[1], 'b', ARGV[1], 's', ARGV[2])
  end
end
local values = redis.call('HMGET', KEYS[1], 'b', 's')
if not values[1] then return {} end
local held = 0
for _, amount in ipairs(redis.call('HVALS', KEYS[2])) do held = held + tonumber(amount) end
return {tonumber(values[1]), tonumber(values[2]), held}
