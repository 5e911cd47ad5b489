#!/bin/sh
# Installs what the tests run besides Python packages (Debian/Ubuntu, as root):
#   sh deploy/local/install-tools.sh              prometheus + promtool (observability tests);
#                                                 node + npm (a real OpenID provider);
#                                                 rabbitmq-server and redis-server, from which
#                                                 the cluster tests start their own 3-node
#                                                 RabbitMQ cluster and Redis Sentinel group
#                                                 (usually there already: the shared broker and
#                                                 Redis come from them); libfaketime (a
#                                                 worker with its clock behind); and checks
#                                                 kubectl/kustomize (tests/deploy renders the
#                                                 Kubernetes manifests with it)
#   sh deploy/local/install-tools.sh container    also podman, runc and debootstrap
#                                                 (make image-test builds and runs the image)
# hadolint, kubernetes-validate and jsonschema come with the Python dev extras (pip).
# Packaged services that an installation starts are stopped again: the tests run their own.
set -eu

need_apt() {
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "missing: $* (install the Debian packages: apt-get install -y $*)" >&2
    exit 1
  fi
}

apt_install() {
  need_apt "$@"
  echo "installing $* with apt-get..." >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

missing=""
command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 ||
  missing="$missing prometheus"
[ -x "${RABBITMQ_SBIN:-/usr/lib/rabbitmq/bin}/rabbitmq-server" ] || missing="$missing rabbitmq-server"
command -v redis-server >/dev/null 2>&1 || missing="$missing redis-server"
# node + npm: tests/identity/test_oidc_provider.py signs in against a real OpenID provider.
command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 || missing="$missing nodejs npm"
# libfaketime: the chaos test runs one worker with its wall clock 120 s behind.
ls /usr/lib/*/faketime/libfaketime.so.1 >/dev/null 2>&1 || missing="$missing libfaketime"
if [ -n "$missing" ]; then
  # shellcheck disable=SC2086 # one word per package
  apt_install $missing
  for package in $missing; do
    case "$package" in
      # The Debian package starts a system Prometheus on :9090; the tests run their own.
      prometheus) (service prometheus stop || pkill -x prometheus || true) >/dev/null 2>&1 ;;
      # Installed only because they were missing, so no shared service ran from them.
      rabbitmq-server | redis-server) (service "$package" stop || true) >/dev/null 2>&1 ;;
    esac
  done
fi

# kustomize (standalone or built into kubectl >= 1.21). Debian has no current one; the
# machines this project runs on ship kubectl.
if ! command -v kustomize >/dev/null 2>&1 && ! kubectl kustomize --help >/dev/null 2>&1; then
  echo "missing: kustomize (install kubectl >= 1.27 or kustomize >= 5; see kubernetes.io)" >&2
  exit 1
fi

if [ "${1:-}" = "container" ]; then
  missing=""
  for tool in podman runc debootstrap; do
    command -v "$tool" >/dev/null 2>&1 || missing="$missing $tool"
  done
  if [ -n "$missing" ]; then
    # shellcheck disable=SC2086 # one word per package
    apt_install $missing uidmap containernetworking-plugins
  fi
fi
