-- Prepended to every script that brings a ledger balance into the cache: the one rule for it. The
-- balance is installed if the account is not cached, taken if its sequence is newer than the
-- cache's, and otherwise ignored; holds are never touched. So out-of-order updates and reloads can
-- leave the cache stale-low for a moment, never stale-high.
local function install(account, balance_fen, seq)
  local cached = redis.call('HGET', account, 's')
  if (not cached) or tonumber(cached) < tonumber(seq) then
    redis.call('HSET', account, 'b', balance_fen, 's', seq)
  end
end
