#!/usr/bin/env bash
# Start a throw-away PostgreSQL cluster for the store tests and print its SQLAlchemy URL.
#
#   url="$(bash scripts/start-test-postgres.sh)"   # start (or reuse) it
#   bash scripts/start-test-postgres.sh --stop      # stop it and delete its data
#
# Idempotent: a cluster already running in $CDS_TEST_POSTGRES_DIR is reused. It listens on
# 127.0.0.1 only, on a free port, with a random password; its data lives in a temp dir.
# As root it installs Debian's postgresql package when missing and runs the server as the
# `postgres` user (initdb refuses root). Only the URL goes to stdout; progress goes to stderr.
set -euo pipefail

# Under /tmp (not $TMPDIR): the postgres user must be able to reach it when we run as root.
DIR="${CDS_TEST_POSTGRES_DIR:-/tmp/magnesium-cds-test-postgres-$(id -u)}"
DB=cds_test
MARKER=.magnesium-cds-test-postgres
log() { echo "start-test-postgres: $*" >&2; }

discard_dir() {  # only ever a directory this script made
  if [[ -e "$DIR" && -n "$(ls -A "$DIR" 2>/dev/null)" && ! -f "$DIR/$MARKER" ]]; then
    log "$DIR exists and was not made by this script: not touching it"
    exit 1
  fi
  rm -rf "$DIR"
}

find_bin() {  # Debian keeps the server programs out of PATH, one directory per version
  local name=$1 found
  found="$(ls -1d /usr/lib/postgresql/*/bin/"$name" 2>/dev/null | sort -V | tail -n 1 || true)"
  if [[ -n "$found" ]]; then echo "$found"; else command -v "$name" || true; fi
}

if [[ $(id -u) -eq 0 ]]; then
  as_server_user() { runuser -u postgres -- "$@"; }
else
  as_server_user() { "$@"; }
fi

if [[ "${1:-}" == "--stop" ]]; then
  PG_CTL="$(find_bin pg_ctl)"
  if [[ -n "$PG_CTL" && -f "$DIR/data/PG_VERSION" ]]; then
    as_server_user "$PG_CTL" -D "$DIR/data" -m fast stop >&2 || true
  fi
  discard_dir
  exit 0
fi

if [[ -z "$(find_bin initdb)" ]]; then
  if [[ $(id -u) -ne 0 ]]; then
    log "PostgreSQL is not installed and only root can install it (apt-get install postgresql)"
    exit 1
  fi
  log "installing Debian's postgresql package"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends postgresql >&2
fi
INITDB="$(find_bin initdb)"
PG_CTL="$(find_bin pg_ctl)"
PSQL="$(find_bin psql)"
PG_ISREADY="$(find_bin pg_isready)"

url() { echo "postgresql+psycopg://postgres:$(cat "$DIR/password")@127.0.0.1:$(cat "$DIR/port")/$DB"; }

# Reuse a cluster this script started earlier, if it still accepts connections.
if [[ -f "$DIR/port" && -f "$DIR/password" && -f "$DIR/data/postmaster.pid" ]] \
  && "$PG_ISREADY" -q -h 127.0.0.1 -p "$(cat "$DIR/port")" -t 2; then
  url
  exit 0
fi

# Anything left over (a stopped cluster, a half-made directory) is discarded.
if [[ -f "$DIR/data/postmaster.pid" ]]; then
  as_server_user "$PG_CTL" -D "$DIR/data" -m immediate stop >/dev/null 2>&1 || true
fi
discard_dir
mkdir -p "$DIR"
chmod 700 "$DIR"
touch "$DIR/$MARKER"
python3 -c 'import secrets; print(secrets.token_hex(16))' >"$DIR/password"
python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' >"$DIR/port"
if [[ $(id -u) -eq 0 ]]; then chown -R postgres: "$DIR"; fi
PORT="$(cat "$DIR/port")"

log "initdb in $DIR/data"
as_server_user "$INITDB" -D "$DIR/data" -U postgres --auth=scram-sha-256 \
  --pwfile="$DIR/password" --encoding=UTF8 --locale=C.UTF-8 >"$DIR/initdb.log" 2>&1 \
  || { cat "$DIR/initdb.log" >&2; exit 1; }
log "starting on 127.0.0.1:$PORT"
# fsync off: a throw-away test cluster trades durability for speed.
as_server_user "$PG_CTL" -D "$DIR/data" -l "$DIR/server.log" -w -t 60 start \
  -o "-c listen_addresses=127.0.0.1 -p $PORT -k $DIR -c fsync=off -c full_page_writes=off -c max_connections=200" >&2 \
  || { cat "$DIR/server.log" >&2; exit 1; }
PGPASSWORD="$(cat "$DIR/password")" "$PSQL" -h 127.0.0.1 -p "$PORT" -U postgres -d postgres \
  -v ON_ERROR_STOP=1 -qc "CREATE DATABASE $DB" >&2
url
