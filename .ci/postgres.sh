#!/usr/bin/env bash
# Install (Debian's package) and start PostgreSQL on 127.0.0.1:5432 with a `pipeline` role and
# database, for the scale-out tests. Prints the URL the tests read from PIPELINE_TEST_POSTGRES.
# Idempotent: an installed, running server is left as it is.
set -euo pipefail
start_postgres() {
    if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq postgresql >/dev/null
    fi
    version=$(ls /usr/lib/postgresql | sort -V | tail -1)
    if ! pg_lsclusters -h | awk '{print $1" "$2}' | grep -qx "$version main"; then
        pg_createcluster "$version" main >/dev/null
    fi
    if ! pg_lsclusters -h | grep -q "^$version main .* online"; then
        pg_ctlcluster "$version" main start
    fi
    for _ in $(seq 30); do
        pg_isready -q -h 127.0.0.1 -p 5432 && break
        sleep 1
    done
    as_postgres() { runuser -u postgres -- "$@"; }
    # CREATEDB: each test makes its own throw-away databases.
    if ! as_postgres psql -tAc "SELECT 1 FROM pg_roles WHERE rolname='pipeline'" | grep -q 1; then
        as_postgres psql -qc "CREATE ROLE pipeline LOGIN CREATEDB PASSWORD 'pipeline'"
    fi
    if ! as_postgres psql -tAc "SELECT 1 FROM pg_database WHERE datname='pipeline'" | grep -q 1; then
        as_postgres createdb -O pipeline pipeline
    fi
}
# Only the URL goes to stdout, which callers capture: pg_ctlcluster and friends chat on stdout
# ("Removed stale pid file." broke CI once), so everything else goes to stderr. No extra file
# descriptor is opened: the server would inherit it and the caller's $(...) would never end.
start_postgres >&2
echo "postgresql://pipeline:pipeline@127.0.0.1:5432/pipeline"
