-- KEYS[1] account hash {a:<id>}; ARGV balance_fen, seq. Installs a ledger balance read or
-- committed elsewhere (a reload, a credit, a refund) by the rule of install.lua. Holds are kept.
install(KEYS[1], ARGV[1], ARGV[2])
return 1
