#!/usr/bin/env bash
# An MLflow tracking server for synaug runs of many processes or machines (README: "MLflow tracking server"):
#     tools/mlflow_server.sh postgresql+psycopg2://USER:PASS@HOST:5432/DB [mlflow server options ...]
# (+psycopg2: SQLAlchemy 2.1 reads a plain postgresql:// as psycopg 3, which synaug does not install.)
# Runs and metrics go to the PostgreSQL database (MLflow creates its tables on the first start); artifacts are
# uploaded through the server into mlruns/server-artifacts/ (relative to where it is started), so clients need no
# access to that folder. It binds to 127.0.0.1:5000: only this machine can reach it until `--host 0.0.0.0` (with
# `--allowed-hosts`) says otherwise. Options after the URL go to `mlflow server` and override these defaults
# (`--port 5001`, `--artifacts-destination s3://bucket/path`, `--workers 2`). Clients:
#     MLFLOW_TRACKING_URI=http://127.0.0.1:5000 synaug fit ...
# The password may stay out of the URL (and of `ps`): libpq reads ~/.pgpass and $PGPASSWORD. $MLFLOW names the
# mlflow executable (default: the checkout's .venv/bin/mlflow).
set -euo pipefail
if [ $# -lt 1 ] || [[ "$1" == -* ]]; then
  echo "usage: $0 postgresql+psycopg2://USER:PASS@HOST:5432/DB [mlflow server options ...]" >&2
  exit 2
fi
backend=$1
shift
mlflow=${MLFLOW:-$(dirname "$0")/../.venv/bin/mlflow}
artifacts=$(realpath -m mlruns/server-artifacts)
# Its job runner (a second process importing MLflow) runs GenAI jobs (prompt optimisation, scorers): synaug has none.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}
# exec: the server is this process, so a signal to it (Ctrl-C, a supervisor's stop) reaches mlflow itself.
exec "$mlflow" server --backend-store-uri "$backend" --artifacts-destination "$artifacts" \
  --host 127.0.0.1 --port 5000 "$@"
