#!/usr/bin/env bash
# Installs what the Slurm tests need on a fresh Debian/Ubuntu machine, saying what it does: Slurm
# (slurm-wlm: slurmctld, slurmd and the client commands) and MUNGE (munge), from the distribution.
# It installs nothing else and starts nothing: the tests (tests/slurm_cluster.py) start their own
# munged, slurmctld and slurmd with configuration and state in a temporary folder, and stop them after.
# Non-interactive (no stdin needed), and safe to run again: it skips whatever is already there.
set -euo pipefail

say() { printf '\033[1m[slurm]\033[0m %s\n' "$*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo -n "$@"; else
  say "need root for: $*"; exit 1; fi; }

missing=()
for tool in slurmctld slurmd sbatch squeue scontrol sinfo; do
  command -v "$tool" >/dev/null || { missing+=(slurm-wlm); break; }
done
command -v munged >/dev/null && command -v munge >/dev/null || missing+=(munge)

if [ ${#missing[@]} -gt 0 ]; then
  # shellcheck disable=SC2207  # de-duplicate the list
  missing=($(printf '%s\n' "${missing[@]}" | sort -u))
  say "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # The packages' maintainer scripts would start the system's munge and Slurm services; on a machine
  # without systemd that fails or does nothing, and the tests start their own daemons anyway, so a
  # policy-rc.d that forbids starting services is put in place for the install (and removed after).
  policy=/usr/sbin/policy-rc.d
  added_policy=0
  if [ ! -e "$policy" ]; then
    as_root sh -c "printf '#!/bin/sh\nexit 101\n' > $policy && chmod 755 $policy"
    added_policy=1
  fi
  trap 'if [ "$added_policy" = 1 ]; then as_root rm -f "$policy"; fi' EXIT
  as_root apt-get update -qq -o DPkg::Lock::Timeout=300 </dev/null
  as_root apt-get install -y -qq --no-install-recommends -o DPkg::Lock::Timeout=300 \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "${missing[@]}" </dev/null >/dev/null
  say "installed: $(slurmctld -V 2>/dev/null || echo 'slurmctld ?'), $(munged -V 2>/dev/null | head -1 || echo 'munge ?')"
fi
