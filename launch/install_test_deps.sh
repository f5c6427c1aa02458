#!/usr/bin/env bash
# Install the Debian packages the test suite needs beyond the Python venv. Idempotent: when
# everything is present it prints so and changes nothing.
#   slurm-wlm, munge  tests/test_slurm.py starts a two-node Slurm cluster on this host
#   prometheus        tests/test_telemetry.py points it at Ray's metrics
#
#   bash launch/install_test_deps.sh
#
# Needs root (or sudo) and apt-get. Package services are NOT started: the tests start their own
# daemons with private configs, keys, sockets and ports, and stop them again.
set -euo pipefail

# Installed without recommends: slurm-wlm is then exactly slurmctld + slurmd + slurm-client (and their
# dependencies, e.g. slurm-wlm-basic-plugins); the recommends would add every plugin and -dev package.
PACKAGES=(slurm-wlm munge prometheus)
# Commands the tests call; all of them come from PACKAGES (prometheus: tests/test_telemetry.py).
COMMANDS=(slurmctld slurmd sbatch squeue scontrol scancel sinfo srun munged munge unmunge prometheus)

installed() { [ "$(dpkg-query -W -f='${db:Status-Abbrev}' "$1" 2>/dev/null | cut -c1-2)" = "ii" ]; }

missing=()
for p in "${PACKAGES[@]}"; do installed "$p" || missing+=("$p"); done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install_test_deps: already installed: ${PACKAGES[*]} (nothing to do)"
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_test_deps: apt-get not found; install these by other means: ${missing[*]}" >&2
  exit 1
fi
SUDO=()
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO=(sudo -n); else
    echo "install_test_deps: must run as root (or with sudo) to install: ${missing[*]}" >&2
    exit 1
  fi
fi

# Keep package postinst scripts from starting munge/slurm services (Debian's policy-rc.d hook),
# unless the machine already has such a policy; a policy we add is removed again on exit.
POLICY=/usr/sbin/policy-rc.d
added_policy=0
before=$(mktemp)
log=$(mktemp)
cleanup() {
  rm -f "$before" "$log"
  if [ "$added_policy" = 1 ]; then "${SUDO[@]}" rm -f "$POLICY"; fi
}
trap cleanup EXIT
if [ ! -e "$POLICY" ]; then
  printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee "$POLICY" >/dev/null
  "${SUDO[@]}" chmod 755 "$POLICY"
  added_policy=1
fi
dpkg-query -W -f='${Package}\n' | sort >"$before"

echo "install_test_deps: installing ${missing[*]} (apt-get)"
export DEBIAN_FRONTEND=noninteractive
apt_opts=(-y -q -o Dpkg::Use-Pty=0 -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)
# Try with the current package lists first; refresh them once if that fails (e.g. never updated).
if ! "${SUDO[@]}" apt-get install "${apt_opts[@]}" --no-install-recommends "${PACKAGES[@]}" >"$log" 2>&1; then
  echo "install_test_deps: first attempt failed; running apt-get update and retrying"
  if ! "${SUDO[@]}" apt-get update -q >>"$log" 2>&1 ||
     ! "${SUDO[@]}" apt-get install "${apt_opts[@]}" --no-install-recommends "${PACKAGES[@]}" >>"$log" 2>&1; then
    tail -n 30 "$log" >&2
    echo "install_test_deps: apt-get failed (the last 30 lines of its output are above)" >&2
    exit 1
  fi
fi

new=$(dpkg-query -W -f='${Package}\n' | sort | comm -13 "$before" -)
echo "install_test_deps: installed $(echo "$new" | grep -c . || true) new package(s):"
for p in $new; do printf '  %s %s\n' "$p" "$(dpkg-query -W -f='${Version}' "$p")"; done

for p in "${PACKAGES[@]}"; do
  installed "$p" || { echo "install_test_deps: $p is still not installed" >&2; exit 1; }
done
for c in "${COMMANDS[@]}"; do
  command -v "$c" >/dev/null 2>&1 || { echo "install_test_deps: command $c missing after install" >&2; exit 1; }
done
echo "install_test_deps: done ($(slurmd -V 2>&1 | head -n1), $(munged -V 2>&1 | head -n1))"
