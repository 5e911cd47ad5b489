#!/bin/sh
# One-shot set-up of the Compose stack (service `init` of deploy/compose.yaml), run with the
# dispatcher's admin settings:
#   1. apply the fleet file (idempotent: applying again updates in place);
#   2. register each machine of RUNDISPATCH_COMPOSE_MACHINES and the submitter
#      RUNDISPATCH_COMPOSE_SUBMITTER (acting for RUNDISPATCH_COMPOSE_ACTS_FOR), each getting its
#      own broker identity, and write what its process needs into the `identities` volume:
#        machines/<id>/worker.env         RUNDISPATCH_AMQP_URL of the machine's identity
#        submitters/<name>/submitter.env  RUNDISPATCH_AMQP_URL of the submitter's identity
#      Each worker mounts only its own machines/<id> directory, read-only.
# A principal that already has its file is left alone: registering again rotates its
# credentials, which is what `rundispatch machines register` is for when a machine is
# replaced, not what a restart of the stack should do.
set -eu

identities=/var/lib/rundispatch
umask 077

# Prints RUNDISPATCH_AMQP_URL=<amqp_url> from the JSON a `register --json` command printed.
env_from_registration() {
  python3 -c 'import json, sys; print("RUNDISPATCH_AMQP_URL=" + json.load(sys.stdin)["amqp_url"])'
}

rundispatch apply /etc/rundispatch/fleet.yaml

for machine in ${RUNDISPATCH_COMPOSE_MACHINES}; do
  dir="${identities}/machines/${machine}"
  if [ -s "${dir}/worker.env" ]; then
    echo "machine ${machine}: registered already"
    continue
  fi
  mkdir -p "${dir}"
  rundispatch machines register "${machine}" --json | env_from_registration > "${dir}/worker.env.new"
  mv "${dir}/worker.env.new" "${dir}/worker.env"
  echo "machine ${machine}: registered"
done

submitter="${RUNDISPATCH_COMPOSE_SUBMITTER}"
dir="${identities}/submitters/${submitter}"
if [ -s "${dir}/submitter.env" ]; then
  echo "submitter ${submitter}: registered already"
else
  mkdir -p "${dir}"
  rundispatch submitters register "${submitter}" --acts-for "${RUNDISPATCH_COMPOSE_ACTS_FOR}" \
    --json | env_from_registration > "${dir}/submitter.env.new"
  mv "${dir}/submitter.env.new" "${dir}/submitter.env"
  echo "submitter ${submitter}: registered"
fi
