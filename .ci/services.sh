#!/usr/bin/env bash
# The services the labelling app's tests need, installed from Debian's packages and started here:
# PostgreSQL 15 (a cluster on 127.0.0.1:5432 with a role that may create test databases) and Chromium (driven
# headless by Playwright; no browser download). Idempotent: safe to run again on a machine that has them.
# Prints the export line for the test database URL; `.ci/run` evals it.
set -euo pipefail
need=()
command -v chromium >/dev/null || need+=(chromium)
command -v pg_ctlcluster >/dev/null || need+=(postgresql)
if ((${#need[@]})); then
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >&2
fi
version=$(ls /usr/lib/postgresql | sort -n | tail -1)
pg_lsclusters -h | grep -q "^$version main" || pg_createcluster "$version" main >&2
pg_ctlcluster "$version" main start >&2 2>/dev/null || true  # already running is fine
for _ in $(seq 30); do pg_isready -q -h 127.0.0.1 && break; sleep 0.5; done
su postgres -c "psql -q -v ON_ERROR_STOP=1" >&2 <<'SQL'
DO $$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'rlhflab') THEN
    CREATE ROLE rlhflab LOGIN CREATEDB PASSWORD 'rlhflab';
  END IF;
END $$;
SQL
echo "export RLHFLAB_TEST_PG_URL=postgresql://rlhflab:rlhflab@127.0.0.1:5432/postgres"
