-- KEYS[1] account hash, KEYS[2] its holds hash; ARGV, optional: balance_fen, seq read from the
-- ledger, installed first (install.lua).
-- Returns {balance_fen, seq, held_fen}, or {} when the account is not loaded. Held money is
-- summed from the holds themselves, never a counter that could drift.
if ARGV[2] then install(KEYS[1], ARGV[1], ARGV[2]) end
local values = redis.call('HMGET', KEYS[1], 'b', 's')
if not values[1] then return {} end
local held = 0
for _, amount in ipairs(redis.call('HVALS', KEYS[2])) do held = held + tonumber(amount) end
return {tonumber(values[1]), tonumber(values[2]), held}
