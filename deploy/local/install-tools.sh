#!/bin/sh
# Installs the Prometheus server and promtool (Debian/Ubuntu) that the tests use.
set -eu
if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "prometheus/promtool are missing: install the 'prometheus' package (apt-get install -y prometheus)" >&2
  exit 1
fi
echo "installing prometheus (promtool) with apt-get..." >&2
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
# The Debian package starts a system Prometheus on :9090; the tests run their own.
(service prometheus stop || pkill -x prometheus || true) >/dev/null 2>&1
