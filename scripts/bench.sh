#!/usr/bin/env bash
# Reproduces BENCHMARKS.md in one command: baselines and scenarios on this machine, against the
# embedded default and against PostgreSQL + Redis, all on the same cores. Results go to
# target/bench/*.json and one summary line each on stdout.
#
#   scripts/bench.sh                 # everything (about 10 minutes)
#   SECONDS_PER_RUN=10 ACCOUNTS=20000 BACKENDS=postgres-redis scripts/bench.sh
#
# Needs redis-server and PostgreSQL binaries (scripts/test.sh installs them) and pgbench.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked --bin yibao
Y=target/release/yibao
OUT=target/bench
mkdir -p "$OUT"
RUN_SECONDS=${SECONDS_PER_RUN:-20}
ACCOUNTS=${ACCOUNTS:-100000}
RATE=${RATE:-3500}
CONNECTIONS=${CONNECTIONS:-8}
export YIBAO_OPERATOR_KEY=bench-operator-key-0123456789
export YIBAO_PIN_PEPPER=bench-pepper
work=$(mktemp -d)
chmod 755 "$work"
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

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
as_pg "$pg_bin/postgres" -D "$work/pg/data" -p "$pg_port" -k "$work/pg/data" -c listen_addresses=127.0.0.1 \
  -c fsync=on -c synchronous_commit=on -c shared_buffers=512MB -c max_connections=200 >"$work/pg.log" 2>&1 & pids+=($!)
until "$pg_bin/pg_isready" -h 127.0.0.1 -p "$pg_port" >/dev/null 2>&1; do sleep 0.2; done
until redis-cli -p "$redis_port" ping >/dev/null 2>&1; do sleep 0.2; done
pg_url="postgres://postgres@127.0.0.1:$pg_port/postgres"

# --- baselines ------------------------------------------------------------------------------
if [ -z "${SKIP_BASELINES:-}" ]; then
echo "== baselines"
$Y bench argon2 --threads 2 --seconds 10 | tee "$OUT/argon2.txt"
$Y bench noop --rate 20000 --seconds "$RUN_SECONDS" --connections "$CONNECTIONS" --scenario noop --json "$OUT/noop.json"
psql -q -h 127.0.0.1 -p "$pg_port" -U postgres -c "CREATE TABLE IF NOT EXISTS one_row (id BIGSERIAL PRIMARY KEY, v INT NOT NULL)" postgres
echo "INSERT INTO one_row (v) VALUES (1);" > "$work/one_row.sql"
for clients in 16 64; do
  "$pg_bin/pgbench" -n -h 127.0.0.1 -p "$pg_port" -U postgres -c "$clients" -j 2 -T "$RUN_SECONDS" -f "$work/one_row.sql" postgres \
    | grep -E "^tps" | sed "s/^/pgbench one-row commit, $clients clients: /" | tee "$OUT/pgbench-$clients.txt"
done
fi

# --- scenarios on each backend pair ---------------------------------------------------------
run_backend() {
  local name=$1; shift
  local port; port=$(free_port)
  $Y serve --listen "127.0.0.1:$port" --data-dir "$work/$name" "$@" >"$work/$name.log" 2>&1 & local gw=$!
  pids+=($gw)
  until $Y balance --server "http://127.0.0.1:$port" --key "$YIBAO_OPERATOR_KEY" --psn-no none >/dev/null 2>&1 \
        || grep -q "UNKNOWN_PERSON" <($Y balance --server "http://127.0.0.1:$port" --key "$YIBAO_OPERATOR_KEY" --psn-no none 2>&1); do
    sleep 0.3
  done
  local base=(--server "http://127.0.0.1:$port" --accounts "$ACCOUNTS" --prefix BN --connections "$CONNECTIONS" --seconds "$RUN_SECONDS")
  echo "== $name"
  $Y bench run "${base[@]}" --rate "$RATE" --scenario "$name-a-evoucher" --json "$OUT/$name-a.json"
  $Y bench run "${base[@]}" --rate "$RATE" --family-share 0.3 --scenario "$name-b-family" --json "$OUT/$name-b.json"
  $Y bench run "${base[@]}" --rate 60 --pin-share 1.0 --scenario "$name-c-pin" --json "$OUT/$name-c.json"
  $Y bench run "${base[@]}" --rate "$RATE" --hot-share 0.5 --scenario "$name-d-hot" --json "$OUT/$name-d.json"
  kill "$gw"; wait "$gw" 2>/dev/null || true
}
case " ${BACKENDS:-embedded postgres-redis} " in *" embedded "*) run_backend embedded ;; esac
case " ${BACKENDS:-embedded postgres-redis} " in
  *" postgres-redis "*) run_backend postgres-redis --ledger-url "$pg_url" --redis-url "redis://127.0.0.1:$redis_port/0" ;;
esac
echo "results in $OUT"
