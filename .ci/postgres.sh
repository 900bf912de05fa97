#!/usr/bin/env bash
# A local PostgreSQL for the tests that need one (tests/experiment/test_tune_postgres.py, the multi-worker tuning test;
# tests/test_tracking_server.py, the MLflow tracking server): installs the Debian package when missing, starts its
# cluster, and creates the role and database the tests connect to:
#     postgresql+psycopg2://synaug:synaug@localhost:5432/synaug_test   (the test reads $SYNAUG_POSTGRES_URL, else this)
# The role may create databases: the tracking-server test makes a fresh one per run (and drops it after).
# Idempotent: a running server and an existing role/database are left as they are. Needs root (or sudo).
set -euo pipefail
SUDO=$([ "$(id -u)" = 0 ] || echo sudo)

if ! command -v pg_lsclusters >/dev/null; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql >/dev/null
fi
# The Debian package creates a cluster `main` of its version (unless told not to); in a container its service is
# not started.
if [ -z "$(pg_lsclusters --no-header)" ]; then
  $SUDO pg_createcluster "$(ls /usr/lib/postgresql | sort -V | tail -1)" main
fi
read -r version cluster port status _ < <(pg_lsclusters --no-header | head -1)
if [ "$status" != online ]; then
  $SUDO pg_ctlcluster "$version" "$cluster" start
fi
if [ -z "$SUDO" ]; then as_postgres() { runuser -u postgres -- "$@"; }; else as_postgres() { sudo -u postgres "$@"; }; fi
psql_postgres() { as_postgres psql -p "$port" -tAc "$1"; }
[ "$(psql_postgres "SELECT 1 FROM pg_roles WHERE rolname = 'synaug'")" = 1 ] \
  || psql_postgres "CREATE ROLE synaug LOGIN CREATEDB PASSWORD 'synaug'"
[ "$(psql_postgres "SELECT rolcreatedb FROM pg_roles WHERE rolname = 'synaug'")" = t ] \
  || psql_postgres "ALTER ROLE synaug CREATEDB"  # a role made by an earlier version of this script
[ "$(psql_postgres "SELECT 1 FROM pg_database WHERE datname = 'synaug_test'")" = 1 ] \
  || psql_postgres "CREATE DATABASE synaug_test OWNER synaug"
echo "PostgreSQL $version/$cluster on port $port: postgresql+psycopg2://synaug:synaug@localhost:$port/synaug_test"
