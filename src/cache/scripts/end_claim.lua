-- KEYS[1] a request's remembered answer, KEYS[2] its claim (same hash tag); ARGV owner, setl_id
-- (empty: no answer), answer_ttl_seconds. Remembers the answer, then drops the claim if the owner
-- still holds it.
if ARGV[2] ~= '' then redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3]) end
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
return 1
