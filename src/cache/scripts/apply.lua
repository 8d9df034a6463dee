-- KEYS[1] account hash; ARGV balance_fen, seq. A committed change without a hold: taken if newer
-- than the cache's balance, or installed if the account is not cached.
local seq = redis.call('HGET', KEYS[1], 's')
if (not seq) or tonumber(seq) < tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], 'b', ARGV[1], 's', ARGV[2])
end
return 1
