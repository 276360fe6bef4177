#!/usr/bin/env bash
# Starts Debian's PostgreSQL cluster if it is not running, and creates the role the tests use.
# The tests create and drop their own databases; ZEUS_TEST_DATABASE_URL overrides all of this.
set -euo pipefail
if [[ -n "${ZEUS_TEST_DATABASE_URL:-}" ]]; then
  exit 0
fi
version=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
if ! pg_lsclusters --no-header | grep -q "^${version} *main"; then
  pg_createcluster "$version" main >/dev/null
fi
if ! pg_lsclusters --no-header | grep -q "^${version} *main .*online"; then
  pg_ctlcluster "$version" main start
fi
for _ in $(seq 1 30); do
  runuser -u postgres -- pg_isready -q && break
  sleep 1
done
runuser -u postgres -- psql -q -v ON_ERROR_STOP=1 <<'SQL'
DO $$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'zeus_test') THEN
    CREATE ROLE zeus_test LOGIN CREATEDB PASSWORD 'zeus_test';
  END IF;
END
$$;
-- DROP DATABASE ... WITH (FORCE) terminates the sessions still on the database; an autovacuum
-- worker there belongs to no role, and without pg_signal_backend the drop fails with
-- "must be a member of the role whose process is being terminated" (seen in CI).
GRANT pg_signal_backend TO zeus_test;
SQL
echo "PostgreSQL ${version} ready; tests use postgresql://zeus_test:zeus_test@127.0.0.1:5432/"
