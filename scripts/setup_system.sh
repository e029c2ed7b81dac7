#!/usr/bin/env bash
# System packages the multi-host tests need (Debian): openssh-server (each simulated host's sshd), pdsh
# (DeepSpeed's default multi-node runner) and strace (the Ray test checks whom Ray's processes contact). Run as
# root; scripts/test.sh runs it when it can. Does nothing when they are there; without root or apt-get it says
# what is missing, and the multi-host tests fail saying why (they are never skipped).
set -euo pipefail
missing=()
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
[ -x /usr/bin/pdsh ] || missing+=(pdsh)
command -v strace >/dev/null || missing+=(strace)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "[setup] multi-host tests need: ${missing[*]} (apt-get install ${missing[*]}, as root)" >&2
  exit 0
fi
echo "[setup] installing ${missing[*]} for the multi-host tests"
export DEBIAN_FRONTEND=noninteractive
apt-get -o DPkg::Lock::Timeout=600 update -q >/dev/null
apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "${missing[@]}" >/dev/null
