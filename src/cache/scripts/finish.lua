-- KEYS[1] account hash, KEYS[2] its holds hash; ARGV hold_id, balance_fen, seq ('' to only release).
-- Drops the hold; after a commit, takes the ledger's balance if it is newer.
local amount = redis.call('HGET', KEYS[2], ARGV[1])
local loaded = redis.call('EXISTS', KEYS[1]) == 1
if amount then
  redis.call('HDEL', KEYS[2], ARGV[1])
  if loaded then redis.call('HINCRBY', KEYS[1], 'h', -tonumber(amount)) end
end
if loaded and ARGV[3] ~= '' then
  local seq = redis.call('HGET', KEYS[1], 's')
  if seq and tonumber(seq) < tonumber(ARGV[3]) then
    redis.call('HSET', KEYS[1], 'b', ARGV[2], 's', ARGV[3])
  end
end
return 1
