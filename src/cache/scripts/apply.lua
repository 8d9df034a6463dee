-- KEYS[1] account hash; ARGV balance_fen, seq. A committed change without a hold: taken only if
-- the account is cached and the change is newer.
local seq = redis.call('HGET', KEYS[1], 's')
if seq and tonumber(seq) < tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], 'b', ARGV[1], 's', ARGV[2])
end
return 1
