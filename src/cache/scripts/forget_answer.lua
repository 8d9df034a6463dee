-- KEYS[1] a request's remembered answer; ARGV setl_id. Deletes the answer if it is still setl_id
-- (one the ledger does not know), so that the request can be claimed again.
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
