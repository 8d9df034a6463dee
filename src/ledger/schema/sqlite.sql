-- The embedded ledger's schema (version 1). Amounts are whole fen (INTEGER): exact, and SQLite has
-- no fixed-point type. Personal balances are kept >= 0 by a CHECK, inside the transaction that
-- writes the postings; postings and transaction headers are append-only (triggers refuse UPDATE
-- and DELETE); a transaction whose postings do not sum to zero cannot be closed.

CREATE TABLE IF NOT EXISTS persons (
    psn_no      TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    birth_date  TEXT NOT NULL,
    region      TEXT NOT NULL,
    category    TEXT NOT NULL,
    status      TEXT NOT NULL,
    card_status TEXT NOT NULL DEFAULT 'NORMAL',
    no_pin_tier TEXT,
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS accounts (
    account_id  INTEGER PRIMARY KEY,
    psn_no      TEXT UNIQUE REFERENCES persons(psn_no),
    system_code TEXT UNIQUE,
    status      TEXT NOT NULL,
    balance_fen INTEGER NOT NULL DEFAULT 0,
    seq         INTEGER NOT NULL DEFAULT 0,
    opened_at   TEXT NOT NULL,
    CHECK ((psn_no IS NULL) <> (system_code IS NULL)),
    CHECK (system_code IS NOT NULL OR balance_fen >= 0)
);

CREATE TABLE IF NOT EXISTS txns (
    txn_id        INTEGER PRIMARY KEY,
    kind          TEXT NOT NULL,
    ref           TEXT NOT NULL,
    at            TEXT NOT NULL,
    business_date TEXT NOT NULL,
    value_date    TEXT NOT NULL,
    memo          TEXT NOT NULL DEFAULT ''
);

CREATE TABLE IF NOT EXISTS postings (
    posting_id        INTEGER PRIMARY KEY,
    txn_id            INTEGER NOT NULL REFERENCES txns(txn_id),
    account_id        INTEGER NOT NULL REFERENCES accounts(account_id),
    amount_fen        INTEGER NOT NULL,
    balance_after_fen INTEGER NOT NULL,
    seq               INTEGER NOT NULL,
    family_use        INTEGER NOT NULL DEFAULT 0,
    setl_id           TEXT NOT NULL DEFAULT '',
    counterparty      TEXT NOT NULL DEFAULT '',
    business_date     TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS postings_by_account ON postings(account_id, posting_id);
CREATE INDEX IF NOT EXISTS postings_by_txn ON postings(txn_id);

-- Closing a transaction: the insert is refused unless its postings sum to zero.
CREATE TABLE IF NOT EXISTS txn_closed (txn_id INTEGER PRIMARY KEY REFERENCES txns(txn_id));
CREATE TRIGGER IF NOT EXISTS txn_must_balance BEFORE INSERT ON txn_closed
WHEN (SELECT COALESCE(SUM(amount_fen), 0) FROM postings WHERE txn_id = NEW.txn_id) <> 0
BEGIN SELECT RAISE(ABORT, 'unbalanced transaction'); END;

CREATE TRIGGER IF NOT EXISTS postings_no_update BEFORE UPDATE ON postings
BEGIN SELECT RAISE(ABORT, 'postings are append-only'); END;
CREATE TRIGGER IF NOT EXISTS postings_no_delete BEFORE DELETE ON postings
BEGIN SELECT RAISE(ABORT, 'postings are append-only'); END;
CREATE TRIGGER IF NOT EXISTS txns_no_update BEFORE UPDATE ON txns
BEGIN SELECT RAISE(ABORT, 'transactions are append-only'); END;
CREATE TRIGGER IF NOT EXISTS txns_no_delete BEFORE DELETE ON txns
BEGIN SELECT RAISE(ABORT, 'transactions are append-only'); END;

-- Opening balances carried over by a bulk import (`yibao admin import`), one row per imported
-- account (zero included): how a re-run of the same file knows the balance is there already. The
-- money itself is a posting of an OPENING_BALANCE transaction against MIGRATION_CLEARING.
CREATE TABLE IF NOT EXISTS imported_openings (
    psn_no      TEXT PRIMARY KEY,
    amount_fen  INTEGER NOT NULL CHECK (amount_fen >= 0),
    txn_id      INTEGER,
    imported_at TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS settlements (
    setl_id            TEXT PRIMARY KEY,
    institution_code   TEXT NOT NULL,
    request_id         TEXT NOT NULL,
    fingerprint        TEXT NOT NULL,
    psn_no             TEXT NOT NULL,
    status             TEXT NOT NULL,
    amount_fen         INTEGER NOT NULL,
    acct_pay_fen       INTEGER NOT NULL,
    mulaid_fen         INTEGER NOT NULL,
    cash_fen           INTEGER NOT NULL,
    balc_fen           INTEGER NOT NULL,
    refunded_fen       INTEGER NOT NULL DEFAULT 0,
    channel            TEXT,
    category           TEXT,
    auth_method        TEXT,
    mdtrt_id           TEXT NOT NULL DEFAULT '',
    beneficiary_psn_no TEXT NOT NULL DEFAULT '',
    business_date      TEXT NOT NULL,
    settled_at         TEXT NOT NULL,
    tombstone          INTEGER NOT NULL DEFAULT 0,
    UNIQUE (institution_code, request_id),
    CHECK (refunded_fen >= 0 AND refunded_fen <= acct_pay_fen + mulaid_fen)
);
CREATE INDEX IF NOT EXISTS settlements_no_pin ON settlements(psn_no, business_date);

CREATE TABLE IF NOT EXISTS settlement_debits (
    setl_id      TEXT NOT NULL REFERENCES settlements(setl_id),
    position     INTEGER NOT NULL,
    account_id   INTEGER NOT NULL,
    owner_psn_no TEXT NOT NULL,
    amount_fen   INTEGER NOT NULL CHECK (amount_fen > 0),
    refunded_fen INTEGER NOT NULL DEFAULT 0,
    family       INTEGER NOT NULL,
    PRIMARY KEY (setl_id, position),
    CHECK (refunded_fen >= 0 AND refunded_fen <= amount_fen)
);

CREATE TABLE IF NOT EXISTS refunds (
    refund_id             TEXT PRIMARY KEY,
    institution_code      TEXT NOT NULL,
    request_id            TEXT NOT NULL,
    fingerprint           TEXT NOT NULL,
    setl_id               TEXT NOT NULL REFERENCES settlements(setl_id),
    amount_fen            INTEGER NOT NULL,
    status_after          TEXT NOT NULL,
    refunded_total_fen    INTEGER NOT NULL,
    refundable_after_fen  INTEGER NOT NULL,
    at                    TEXT NOT NULL,
    UNIQUE (institution_code, request_id)
);

CREATE TABLE IF NOT EXISTS refund_credits (
    refund_id    TEXT NOT NULL REFERENCES refunds(refund_id),
    position     INTEGER NOT NULL,
    account_id   INTEGER NOT NULL,
    owner_psn_no TEXT NOT NULL,
    amount_fen   INTEGER NOT NULL,
    family       INTEGER NOT NULL,
    PRIMARY KEY (refund_id, position)
);

CREATE TABLE IF NOT EXISTS adjustments (
    request_id        TEXT PRIMARY KEY,
    hold_id           TEXT NOT NULL DEFAULT '',
    fingerprint       TEXT NOT NULL,
    psn_no            TEXT NOT NULL,
    posting_id        INTEGER NOT NULL,
    delta_fen         INTEGER NOT NULL,
    balance_after_fen INTEGER NOT NULL,
    at                TEXT NOT NULL
);

CREATE INDEX IF NOT EXISTS adjustments_by_hold ON adjustments(hold_id);

-- The fate of every hold-taking write, decided once: committed by the write itself, or fenced by
-- the sweeper after the hold's lease ran out. The primary key makes the two exclusive.
CREATE TABLE IF NOT EXISTS hold_fates (
    hold_id   TEXT PRIMARY KEY,
    committed INTEGER NOT NULL
);

CREATE TABLE IF NOT EXISTS pins (
    psn_no        TEXT PRIMARY KEY REFERENCES persons(psn_no),
    phc           TEXT NOT NULL,
    failed_count  INTEGER NOT NULL DEFAULT 0,
    locked_until  TEXT,
    updated_at    TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS family_links (
    link_id        INTEGER PRIMARY KEY,
    owner_psn_no   TEXT NOT NULL REFERENCES persons(psn_no),
    member_psn_no  TEXT NOT NULL REFERENCES persons(psn_no),
    relation       TEXT NOT NULL,
    effective_from TEXT NOT NULL,
    registered_at  TEXT NOT NULL,
    revoked_at     TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS family_links_active
    ON family_links(owner_psn_no, member_psn_no) WHERE revoked_at IS NULL;
CREATE INDEX IF NOT EXISTS family_links_by_member ON family_links(member_psn_no);

CREATE TABLE IF NOT EXISTS family_order (
    member_psn_no TEXT NOT NULL,
    owner_psn_no  TEXT NOT NULL,
    position      INTEGER NOT NULL,
    PRIMARY KEY (member_psn_no, owner_psn_no)
);

CREATE TABLE IF NOT EXISTS institutions (
    code       TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    kind       TEXT NOT NULL,
    region     TEXT NOT NULL,
    created_at TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS api_keys (
    key_hash         TEXT PRIMARY KEY,
    key_id           TEXT NOT NULL UNIQUE,
    role             TEXT NOT NULL,
    institution_code TEXT REFERENCES institutions(code),
    label            TEXT NOT NULL,
    created_at       TEXT NOT NULL
);

-- ---- money coming in ----------------------------------------------------------------------------

CREATE INDEX IF NOT EXISTS persons_by_region ON persons(region, psn_no);

-- A month's contribution as recorded (RecordContribution): `paid` = paid in full (足额); the
-- category the person had when it was recorded decides the rule a back payment is credited by.
CREATE TABLE IF NOT EXISTS contributions (
    psn_no      TEXT NOT NULL REFERENCES persons(psn_no),
    period      TEXT NOT NULL,
    base_fen    INTEGER NOT NULL CHECK (base_fen >= 0),
    paid        INTEGER NOT NULL,
    category    TEXT NOT NULL,
    recorded_at TEXT NOT NULL,
    PRIMARY KEY (psn_no, period)
);

-- Each (account, month, kind) credited at most once, however often a run is repeated.
CREATE TABLE IF NOT EXISTS credits (
    account_id INTEGER NOT NULL REFERENCES accounts(account_id),
    period     TEXT NOT NULL,
    kind       TEXT NOT NULL,
    amount_fen INTEGER NOT NULL,
    txn_id     INTEGER NOT NULL REFERENCES txns(txn_id),
    PRIMARY KEY (account_id, period, kind)
);

-- Interest rates entered by operators (SetInterestRate), on top of the policy file's table.
CREATE TABLE IF NOT EXISTS interest_rates (
    region              TEXT NOT NULL,
    effective_from      TEXT NOT NULL,
    annual_rate_percent TEXT NOT NULL,
    entered_at          TEXT NOT NULL,
    PRIMARY KEY (region, effective_from)
);

-- Transfers out and in, and liquidations: one row per request id (idempotency), with what moved.
CREATE TABLE IF NOT EXISTS lifecycle_ops (
    request_id   TEXT PRIMARY KEY,
    fingerprint  TEXT NOT NULL,
    kind         TEXT NOT NULL,
    psn_no       TEXT NOT NULL,
    amount_fen   INTEGER NOT NULL,
    interest_fen INTEGER NOT NULL,
    status_after TEXT NOT NULL,
    at           TEXT NOT NULL
);
