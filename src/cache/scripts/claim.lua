-- KEYS[1] a request's remembered answer, KEYS[2] its claim (same hash tag); ARGV owner, ttl_ms.
-- Returns {1, setl_id} if the request settled before, {2, ''} if the claim is now the owner's
-- (or already was: a call retried after its first try set it), {3, ''} if another attempt holds it.
local answer = redis.call('GET', KEYS[1])
if answer then return {1, answer} end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {2, ''} end
if redis.call('GET', KEYS[2]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
  return {2, ''}
end
return {3, ''}
