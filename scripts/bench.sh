#!/usr/bin/env bash
# Reproduces BENCHMARKS.md in one command: baselines and scenarios on this machine, against the
# embedded default and against PostgreSQL + Redis, all on the same cores. Results go to
# target/bench/*.json and one summary line each on stdout.
#
#   scripts/bench.sh                 # everything (about an hour with 10M accounts for scenario f)
#   SECONDS_PER_RUN=10 ACCOUNTS=20000 BACKENDS=postgres-redis scripts/bench.sh
#   SCENARIOS="f" LARGE_ACCOUNTS=1000000 scripts/bench.sh
#   COMPARE="old/yibao target/release/yibao" RATE=2000 SKIP_BASELINES=1 scripts/bench.sh
#
# Scenarios (SCENARIOS, default all): a e-voucher self only, b 30% family, c card + PIN (at PIN_RATE,
# default 90% of the argon2 baseline, or 90/s without baselines), d hot
# accounts (a, b and d audit the books of the hottest 1% of accounts after the run, `--audit`; a
# load run that fails, by its audit or otherwise, is reported, the rest still runs, and the script
# exits non-zero), e rate stepped up until p99 > 20 ms or errors, f scenario a on LARGE_ACCOUNTS accounts
# loaded by `yibao bench population` + `yibao admin import`, with Redis memory per cached account;
# g the monthly crediting run (`yibao admin credit`) over CREDIT_ACCOUNTS accounts (default 1M, plus
# a tenth as many family payers) with a paid contribution each, in a ledger of their own, then the
# same run again (it must credit nothing).
#
# COMPARE (two or more yibao binaries): instead of the scenarios, each binary in turn serves scenario
# (a) on PostgreSQL + Redis (COMPARE_BACKEND=embedded: on the embedded default) at RATE, alternated
# PAIRS times (default 3), each run on a fresh database of COMPARE_ACCOUNTS accounts (default
# 20,000) after a 5 s warm-up; the load comes from this checkout's build. Compare the summary lines'
# machine CPU per settlement ("cpu … ms/ok"): unlike a rate it hardly moves with a noisy hour's
# spare capacity. With THREAD_CPU=1, the gateway's CPU and context switches per thread name over
# 10 s of each run as well (scripts/thread_cpu.py; SECONDS_PER_RUN of 15 or more). (How BENCHMARKS.md's A/Bs are run.)
#
# Needs redis-server and PostgreSQL binaries (scripts/test.sh installs them) and pgbench.
set -euo pipefail
# COMPARE's binaries as the caller named them, before the cd below (a bare name: from PATH).
compare=()
for binary in ${COMPARE:-}; do
  path=$(command -v "$binary" 2>/dev/null || true)
  [ -x "$path" ] || { echo "COMPARE: $binary is not an executable" >&2; exit 1; }
  compare+=("$(realpath "$path")")
done
cd "$(dirname "$0")/.."
cargo build --release --locked --bin yibao
Y=target/release/yibao
OUT=target/bench
mkdir -p "$OUT"
RUN_SECONDS=${SECONDS_PER_RUN:-20}
ACCOUNTS=${ACCOUNTS:-100000}
RATE=${RATE:-3500}
PIN_RATE=${PIN_RATE:-}
CONNECTIONS=${CONNECTIONS:-8}
SCENARIOS=" ${SCENARIOS:-a b c d e f g} "
STEP_FROM=${STEP_FROM:-500}
STEP_BY=${STEP_BY:-500}
STEP_TO=${STEP_TO:-6000}
STEP_SECONDS=${STEP_SECONDS:-10}
LARGE_ACCOUNTS=${LARGE_ACCOUNTS:-10000000}
CREDIT_ACCOUNTS=${CREDIT_ACCOUNTS:-1000000}
case "${COMPARE_BACKEND:=postgres-redis}" in
  embedded | postgres-redis) ;;
  *) echo "COMPARE_BACKEND: embedded or postgres-redis, not $COMPARE_BACKEND" >&2; exit 1 ;;
esac
if [ ${#compare[@]} -gt 0 ] && [ -n "${THREAD_CPU:-}" ] && [ "$RUN_SECONDS" -lt 15 ]; then
  echo "THREAD_CPU measures 10 s from 3 s into each run: SECONDS_PER_RUN must be 15 or more" >&2; exit 1
fi
export YIBAO_OPERATOR_KEY=bench-operator-key-0123456789
export YIBAO_PIN_PEPPER=bench-pepper
work=$(mktemp -d)
chmod 755 "$work"
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
# The summary at the end reads only files written after this.
touch "$work/started"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
pg_bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

# --- backends of our own --------------------------------------------------------------------
redis_port=$(free_port)
redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no --maxmemory-policy noeviction \
  --dir "$work" --logfile "$work/redis.log" & pids+=($!)
pg_port=$(free_port)
mkdir -p "$work/pg" && [ "$(id -u)" != 0 ] || chown postgres "$work/pg"
as_pg "$pg_bin/initdb" -D "$work/pg/data" -A trust -U postgres --no-sync >/dev/null
# The settings we ship for production (checkpoints 15 min apart, 4 GB of WAL between them, …).
echo "include '$PWD/deploy/postgresql.conf'" >>"$work/pg/data/postgresql.conf"
as_pg "$pg_bin/postgres" -D "$work/pg/data" -p "$pg_port" -k "$work/pg/data" -c listen_addresses=127.0.0.1 \
  -c fsync=on -c synchronous_commit=on -c shared_buffers="${PG_SHARED_BUFFERS:-512MB}" -c max_connections=200 >"$work/pg.log" 2>&1 & pids+=($!)
until "$pg_bin/pg_isready" -h 127.0.0.1 -p "$pg_port" >/dev/null 2>&1; do sleep 0.2; done
until redis-cli -p "$redis_port" ping >/dev/null 2>&1; do sleep 0.2; done
pg_url="postgres://postgres@127.0.0.1:$pg_port/postgres"

# --- baselines ------------------------------------------------------------------------------
if [ -z "${SKIP_BASELINES:-}" ]; then
echo "== baselines"
$Y bench argon2 --threads 2 --seconds 10 | tee "$OUT/argon2.txt"
# Scenario c is offered 90% of what argon2 alone verifies here, so "at least 80%" can show.
if [ -z "$PIN_RATE" ]; then PIN_RATE=$(awk '{ for (i = 1; i < NF; i++) if ($(i + 1) == "verifications/s") printf "%.0f", $i * 0.9 }' "$OUT/argon2.txt"); fi
$Y bench noop --rate 20000 --seconds "$RUN_SECONDS" --connections "$CONNECTIONS" --scenario noop --json "$OUT/noop.json"
psql -q -h 127.0.0.1 -p "$pg_port" -U postgres -c "CREATE TABLE IF NOT EXISTS one_row (id BIGSERIAL PRIMARY KEY, v INT NOT NULL)" postgres
echo "INSERT INTO one_row (v) VALUES (1);" > "$work/one_row.sql"
# 16 clients: the gateway's connections at most; 1: its committer's one connection (context for
# the group-commit ratio); 64: PostgreSQL's own group commit across many clients.
for clients in 1 16 64; do
  "$pg_bin/pgbench" -n -h 127.0.0.1 -p "$pg_port" -U postgres -c "$clients" -j 2 -T "$RUN_SECONDS" -f "$work/one_row.sql" postgres \
    | grep -E "^tps" | sed "s/^/pgbench one-row commit, $clients clients: /" | tee "$OUT/pgbench-$clients.txt"
done
fi

PIN_RATE=${PIN_RATE:-90}

# --- scenarios on each backend pair ---------------------------------------------------------
has() { case "$SCENARIOS" in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

# start_gateway NAME SERVE-ARGS…: starts `yibao serve` and waits until it answers; sets $gw, $server.
start_gateway() {
  local name=$1; shift
  local port; port=$(free_port)
  "${GATEWAY:-$Y}" serve --listen "127.0.0.1:$port" "$@" >"$work/$name.log" 2>&1 & gw=$!
  pids+=($gw)
  server="http://127.0.0.1:$port"
  until grep -q "UNKNOWN_PERSON" <($Y balance --server "$server" --key "$YIBAO_OPERATOR_KEY" --psn-no none 2>&1); do
    kill -0 "$gw" 2>/dev/null || { echo "the gateway $name stopped:" >&2; cat "$work/$name.log" >&2; exit 1; }
    sleep 0.3
  done
}

if [ ${#compare[@]} -gt 0 ]; then
  for pair in $(seq "${PAIRS:-3}"); do
    # Each binary first in every other pair, so that neither always follows the other.
    order=("${!compare[@]}")
    if [ $((pair % 2)) = 0 ]; then order=($(printf '%s\n' "${order[@]}" | sort -rn)); fi
    for i in "${order[@]}"; do
      db="compare_${pair}_$i"
      if [ "$COMPARE_BACKEND" = embedded ]; then
        GATEWAY=${compare[$i]} start_gateway "$db" --data-dir "$work/$db"
      else
        psql -q -h 127.0.0.1 -p "$pg_port" -U postgres -c "CREATE DATABASE $db" postgres
        redis-cli -p "$redis_port" flushall >/dev/null
        GATEWAY=${compare[$i]} start_gateway "$db" --ledger-url "postgres://postgres@127.0.0.1:$pg_port/$db" \
          --redis-url "redis://127.0.0.1:$redis_port/0"
      fi
      base=(--server "$server" --accounts "${COMPARE_ACCOUNTS:-20000}" --prefix BA --connections "$CONNECTIONS" --rate "$RATE")
      $Y bench run "${base[@]}" --seconds 5 --scenario warm-up >/dev/null
      run=(--seconds "$RUN_SECONDS" --scenario "${compare[$i]} (run $pair)" --json "$OUT/$db.json")
      if [ -n "${THREAD_CPU:-}" ]; then
        # The gateway's threads over 10 s of the load, once the run's set-up is done (its stderr says).
        python3 scripts/thread_cpu.py "$gw" 10 --after "$work/$db.err" >"$OUT/$db-threads.txt" & threads=$!
        pids+=($threads)
        $Y bench run "${base[@]}" "${run[@]}" 2> >(tee "$work/$db.err" >&2)
        if wait "$threads"; then sed 's/^/  gateway /' "$OUT/$db-threads.txt"; else echo "thread_cpu.py failed for $db" >&2; fi
      else
        $Y bench run "${base[@]}" "${run[@]}"
      fi
      kill "$gw"; wait "$gw" 2>/dev/null || true
      if [ "$COMPARE_BACKEND" = embedded ]; then rm -rf "$work/$db"; else
        psql -q -h 127.0.0.1 -p "$pg_port" -U postgres -c "DROP DATABASE $db" postgres
      fi
    done
  done
  exit 0
fi

# Scenario f: the population written as CSV once, imported into this backend's ledger, then (a).
run_large() {
  local name=$1 ledger_args=$2 redis_args=$3
  local pop="$work/population"
  if [ ! -f "$pop/people.csv" ]; then $Y bench population --accounts "$LARGE_ACCOUNTS" --prefix BL --dir "$pop"; fi
  echo "== $name: importing $LARGE_ACCOUNTS accounts"
  # shellcheck disable=SC2086
  $Y admin import --people "$pop/people.csv" \
    --families "$pop/families.csv" $ledger_args | tee "$OUT/$name-f-import.txt"
  # shellcheck disable=SC2086
  start_gateway "$name-large" $ledger_args $redis_args
  keep_going $Y bench run --server "$server" --accounts "$LARGE_ACCOUNTS" --prefix BL --imported --connections "$CONNECTIONS" \
    --seconds "$RUN_SECONDS" --rate "$RATE" --scenario "$name-f-large" --json "$OUT/$name-f.json"
  if [ -n "$redis_args" ]; then
    # Memory of one cached account (its balance hash), averaged over a sample of the accounts the run touched.
    # (Whole lists to files: `| head` would end the scan early with SIGPIPE, which pipefail fails.)
    redis-cli -p "$redis_port" --scan --pattern 'yb:{a:*}' | grep -v ':h$' >"$work/cached" || true
    local cached; cached=$(wc -l <"$work/cached")
    sed -n 1,2000p "$work/cached" >"$work/sample"
    awk -v p="$redis_port" '{ print "MEMORY USAGE " $0 }' "$work/sample" | redis-cli -p "$redis_port" \
      | awk -v cached="$cached" -v n="$LARGE_ACCOUNTS" '{ s += $1; k++ } END {
          printf "redis memory per cached account: %.0f bytes (MEMORY USAGE over %d of %d cached accounts); all %d accounts cached: %.2f GiB\n",
                 s / k, k, cached, n, s / k * n / 1073741824 }' | tee "$OUT/$name-f-redis-memory.txt"
    redis-cli -p "$redis_port" info memory | grep -E "^used_memory_human" | tee -a "$OUT/$name-f-redis-memory.txt"
  fi
  kill "$gw"; wait "$gw" 2>/dev/null || true
}

# Scenario g: a ledger of its own (other scenarios' people are Beijing's too), CREDIT_ACCOUNTS people
# with last month paid, then `yibao admin credit` for that month, twice.
run_credit() {
  local name=$1 ledger_args=$2 redis_args=$3
  local pop="$work/credit-population"
  local period; period=$(date -d "$(date +%Y-%m-01) -1 month" +%Y-%m)
  if [ ! -f "$pop/people.csv" ]; then
    $Y bench population --accounts "$CREDIT_ACCOUNTS" --prefix BC --dir "$pop"
    # A quarter retirees (Beijing: 100.00 or, from 70, 110.00, less the 3.00 mutual-aid premium: two
    # postings each), the rest employees with a paid month on bases from 3,000.00 to 32,999.99, so
    # the 2% rounds every way.
    awk -F, -v OFS=, 'NR > 1 && NR % 4 == 0 { $5 = "RETIREE"; $3 = (NR % 8 == 0) ? "1950-06-15" : "1960-06-15" } 1' \
      "$pop/people.csv" >"$pop/people.mixed" && mv "$pop/people.mixed" "$pop/people.csv"
    # Retirees get a row too (base 0.00): their accounts open today, after the month credited, and a
    # month before an account opened is credited only when a contribution row says so.
    awk -F, -v p="$period" 'NR == 1 { print "psn_no,period,base,paid,category"; next }
      $5 == "RETIREE" { printf "%s,%s,0.00,true,RETIREE\n", $1, p; next }
      { printf "%s,%s,%d.%02d,true,EMPLOYEE\n", $1, p, 3000 + NR % 30000, NR % 100 }' "$pop/people.csv" >"$pop/contributions.csv"
  fi
  # shellcheck disable=SC2086
  start_gateway "$name-credit" $ledger_args $redis_args
  echo "== $name: crediting $period for $(($(wc -l <"$pop/people.csv") - 1)) people"
  # shellcheck disable=SC2086
  $Y admin import --people "$pop/people.csv" $ledger_args | tee "$OUT/$name-g-import.txt"
  # shellcheck disable=SC2086
  $Y admin contributions import "$pop/contributions.csv" $ledger_args | tee -a "$OUT/$name-g-import.txt"
  for run in first repeat; do
    $Y admin credit --server "$server" --key "$YIBAO_OPERATOR_KEY" --region 110000 --period "$period" --step 100000 \
      | tee "$OUT/$name-g-credit-$run.txt"
  done
  kill "$gw"; wait "$gw" 2>/dev/null || true
}

# A load run that fails (its audit, or otherwise) is reported and the script goes on, so that the
# other backend and the summary still run; the script then exits non-zero.
failed=0
keep_going() { "$@" || { echo "FAILED (exit $?): ${*: -1}" >&2; failed=1; }; }

run_backend() {
  local name=$1 ledger_args=$2 redis_args=$3
  # shellcheck disable=SC2086
  start_gateway "$name" $ledger_args $redis_args
  local base=(--server "$server" --accounts "$ACCOUNTS" --prefix BN --connections "$CONNECTIONS")
  echo "== $name"
  if has a; then keep_going $Y bench run "${base[@]}" --seconds "$RUN_SECONDS" --rate "$RATE" --audit --scenario "$name-a-evoucher" --json "$OUT/$name-a.json"; fi
  if has b; then keep_going $Y bench run "${base[@]}" --seconds "$RUN_SECONDS" --rate "$RATE" --family-share 0.3 --audit --scenario "$name-b-family" --json "$OUT/$name-b.json"; fi
  if has c; then keep_going $Y bench run "${base[@]}" --seconds "$RUN_SECONDS" --rate "$PIN_RATE" --pin-share 1.0 --scenario "$name-c-pin" --json "$OUT/$name-c.json"; fi
  if has d; then keep_going $Y bench run "${base[@]}" --seconds "$RUN_SECONDS" --rate "$RATE" --hot-share 0.5 --audit --scenario "$name-d-hot" --json "$OUT/$name-d.json"; fi
  if has e; then
    keep_going $Y bench run "${base[@]}" --seconds "$STEP_SECONDS" --rate "$STEP_FROM" --step-by "$STEP_BY" --step-to "$STEP_TO" \
      --p99-target-ms 20 --scenario "$name-e-step" --json "$OUT/$name-e.json"
  fi
  kill "$gw"; wait "$gw" 2>/dev/null || true
  if has f; then run_large "$name" "$ledger_args" "$redis_args"; fi
}
# Scenario g's ledger: a data directory, or a database, of its own (and Redis database 1).
credit_url="postgres://postgres@127.0.0.1:$pg_port/credit"
if has g; then psql -q -h 127.0.0.1 -p "$pg_port" -U postgres -c "CREATE DATABASE credit" postgres; fi
case " ${BACKENDS:-embedded postgres-redis} " in
  *" embedded "*)
    run_backend embedded "--data-dir $work/embedded" ""
    if has g; then run_credit embedded "--data-dir $work/credit-embedded" ""; fi ;;
esac
case " ${BACKENDS:-embedded postgres-redis} " in
  *" postgres-redis "*)
    run_backend postgres-redis "--ledger-url $pg_url" "--redis-url redis://127.0.0.1:$redis_port/0"
    if has g; then run_credit postgres-redis "--ledger-url $credit_url" "--redis-url redis://127.0.0.1:$redis_port/1"; fi ;;
esac
echo "== targets"
python3 scripts/bench_summary.py "$OUT" "$work/started" | tee "$OUT/summary.txt"
echo "results in $OUT"
exit "$failed"
