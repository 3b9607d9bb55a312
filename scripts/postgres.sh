#!/usr/bin/env bash
# Start Debian's PostgreSQL on localhost and make the role and database the store tests use
# (postgresql+psycopg://workbench:workbench@localhost:5432/workbench). Idempotent.
set -euo pipefail
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
version=$(ls /usr/lib/postgresql | sort -V | tail -1)
if ! pg_lsclusters -h | grep -q "^$version main"; then
  $SUDO pg_createcluster "$version" main
fi
$SUDO pg_ctlcluster "$version" main start 2>/dev/null || true  # already running is fine
for _ in $(seq 30); do pg_isready -q -h localhost && break; sleep 0.5; done
pg_isready -h localhost
AS_POSTGRES=(sudo -u postgres)
[ "$(id -u)" = 0 ] && AS_POSTGRES=(runuser -u postgres --)
psql_as_postgres() { "${AS_POSTGRES[@]}" psql -v ON_ERROR_STOP=1 -qtA "$@"; }
if [ "$(psql_as_postgres -c "SELECT 1 FROM pg_roles WHERE rolname='workbench'")" != 1 ]; then
  psql_as_postgres -c "CREATE ROLE workbench LOGIN PASSWORD 'workbench' CREATEDB"
fi
if [ "$(psql_as_postgres -c "SELECT 1 FROM pg_database WHERE datname='workbench'")" != 1 ]; then
  psql_as_postgres -c "CREATE DATABASE workbench OWNER workbench"
fi
echo "PostgreSQL $version on localhost:5432, database workbench ready"
