#!/usr/bin/env bash
# Make sure PostgreSQL (127.0.0.1:5432) and Redis (127.0.0.1:6379) answer; start them, or
# install them from Debian's packages first, when they don't. Idempotent and quick when both run.
set -euo pipefail

say() { echo "services: $*" >&2; }
die() { say "$*"; exit 1; }

port_open() { python3 - "$1" <<'PY'
import socket, sys
try:
    socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=1).close()
except OSError:
    sys.exit(1)
PY
}

wait_port() {  # name port seconds
    for _ in $(seq 1 "$3"); do port_open "$2" && return 0; sleep 1; done
    die "$1 did not come up on 127.0.0.1:$2"
}

apt_install() {
    export DEBIAN_FRONTEND=noninteractive
    say "installing $* with apt-get"
    apt-get update -qq >/dev/null && apt-get install -y -qq "$@" >/dev/null || die "apt-get could not install $*"
}

ensure_postgres() {
    port_open 5432 && return 0
    command -v pg_ctlcluster >/dev/null || apt_install postgresql
    local version
    version=$(ls /etc/postgresql | sort -V | tail -1)
    [ -n "$version" ] || die "no PostgreSQL cluster under /etc/postgresql"
    local hba="/etc/postgresql/$version/main/pg_hba.conf"
    if ! grep -qE '^host\s+all\s+all\s+127\.0\.0\.1/32\s+trust' "$hba"; then
        # Tests connect as postgres/root over TCP with trust auth, as on the CI machines.
        sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust\nlocal all all trust' "$hba"
    fi
    say "starting PostgreSQL $version"
    pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    wait_port PostgreSQL 5432 30
    if command -v psql >/dev/null; then
        psql -h 127.0.0.1 -U postgres -tAc "SELECT 1 FROM pg_roles WHERE rolname='root'" | grep -q 1 \
            || psql -h 127.0.0.1 -U postgres -qc "CREATE ROLE root SUPERUSER LOGIN"
        psql -h 127.0.0.1 -U postgres -tAc "SELECT 1 FROM pg_database WHERE datname='test'" | grep -q 1 \
            || psql -h 127.0.0.1 -U postgres -qc "CREATE DATABASE test"
    fi
}

ensure_redis() {
    port_open 6379 && return 0
    command -v redis-server >/dev/null || apt_install redis-server
    mkdir -p /var/lib/redis /var/log/redis
    say "starting Redis"
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
        --dir /var/lib/redis --logfile /var/log/redis/ci.log
    wait_port Redis 6379 30
}

ensure_postgres
ensure_redis
say "PostgreSQL and Redis are up"
