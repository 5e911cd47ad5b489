#!/bin/sh
# Installs what the tests run beside the shared services (Debian/Ubuntu):
# * the Prometheus server and promtool (observability tests);
# * rabbitmq-server and redis-server, from which the cluster tests start their own 3-node
#   RabbitMQ cluster and Redis Sentinel group (deploy/local/rabbitmq_cluster.py,
#   redis_sentinel.py). Usually already there: the shared broker and Redis come from them.
# Packaged services that the installation starts are stopped again: the tests run their own.
set -eu

missing=""
command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 ||
  missing="$missing prometheus"
[ -x "${RABBITMQ_SBIN:-/usr/lib/rabbitmq/bin}/rabbitmq-server" ] || missing="$missing rabbitmq-server"
command -v redis-server >/dev/null 2>&1 || missing="$missing redis-server"
[ -z "$missing" ] && exit 0

if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "missing for the tests:$missing (Debian/Ubuntu: apt-get install -y$missing)" >&2
  exit 1
fi
echo "installing$missing with apt-get..." >&2
apt-get update -qq
# shellcheck disable=SC2086
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
for package in $missing; do
  case "$package" in
    # The Debian package starts a system Prometheus on :9090; the tests run their own.
    prometheus) (service prometheus stop || pkill -x prometheus || true) >/dev/null 2>&1 ;;
    # Installed only because they were missing, so no shared service ran from them.
    rabbitmq-server | redis-server) (service "$package" stop || true) >/dev/null 2>&1 ;;
  esac
done
