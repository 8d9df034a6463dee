-- KEYS[1] account hash, KEYS[2] its holds hash; ARGV hold_id, balance_fen, seq ('' to only release).
-- Drops the hold; after a commit, installs the ledger's balance (install.lua: also when the account
-- is not cached, after a flush, so that no older balance read before this commit can be loaded
-- later).
-- On a single server also KEYS[3], the lease index, with ARGV the hold's index member: unindexed
-- in this same step, after the hold is gone. (On a cluster the caller unindexes after.)
redis.call('HDEL', KEYS[2], ARGV[1])
if ARGV[3] ~= '' then install(KEYS[1], ARGV[2], ARGV[3]) end
if KEYS[3] then redis.call('ZREM', KEYS[3], ARGV[4]) end
return 1
