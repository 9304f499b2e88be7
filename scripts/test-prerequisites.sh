#!/usr/bin/env bash
# Installs and starts what the tests talk to: dcmtk, dicom3tools and Orthanc (Debian packages),
# PostgreSQL and Redis. On this project's machines the services already run; elsewhere they are
# installed and started here. Needs root (or sudo) only where something is missing.
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

need_packages=()
command -v storescu >/dev/null || need_packages+=(dcmtk)
command -v dciodvfy >/dev/null || need_packages+=(dicom3tools)
[ -x /usr/sbin/Orthanc ] || need_packages+=(orthanc)
command -v redis-server >/dev/null || need_packages+=(redis-server)
command -v pg_ctlcluster >/dev/null || need_packages+=(postgresql)
if [ ${#need_packages[@]} -gt 0 ]; then
  echo "installing: ${need_packages[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_packages[@]}" >/dev/null
fi
# Debian starts Orthanc as a service on install; the tests run their own on loopback ports.
$SUDO service orthanc stop >/dev/null 2>&1 || true

if ! pg_isready -h 127.0.0.1 -p 5432 -q; then
  echo "starting PostgreSQL"
  $SUDO pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start
  for _ in $(seq 30); do pg_isready -h 127.0.0.1 -p 5432 -q && break; sleep 1; done
  # Trust local connections the way this project's machines are set up.
  if ! psql -h 127.0.0.1 -U postgres -c 'select 1' >/dev/null 2>&1; then
    echo "PostgreSQL on 127.0.0.1:5432 does not accept user postgres without a password;" \
         "set BRAIN3D_TEST_POSTGRES to a URL that does" >&2
  fi
fi

if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  echo "starting Redis"
  $SUDO mkdir -p /var/lib/redis /var/log/redis
  $SUDO redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  for _ in $(seq 30); do redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && break; sleep 0.5; done
fi
echo "test prerequisites ready"
