-- KEYS[1] account hash {a:<id>}; ARGV balance_fen, seq.
-- Installs a ledger balance unless the cache has one as new or newer. Holds are kept.
local seq = redis.call('HGET', KEYS[1], 's')
if (not seq) or tonumber(seq) < tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], 'b', ARGV[1], 's', ARGV[2])
end
return 1
