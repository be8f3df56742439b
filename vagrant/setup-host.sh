#!/usr/bin/env bash
# Host tools for the Vagrant test, from Debian: Vagrant with its libvirt plugin, libvirt,
# QEMU, debootstrap. No service is started on the host (libvirtd runs per test run, by hand,
# inside the run's network namespace). Idempotent.
set -euo pipefail
pkgs=(vagrant vagrant-libvirt libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients
	qemu-system-x86 qemu-utils dnsmasq-base debootstrap dpkg-dev)
missing=()
for p in "${pkgs[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
	echo "setup-host: Vagrant, libvirt, QEMU, debootstrap: all present"
	exit 0
fi
echo "setup-host: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
if [ ! -e /usr/sbin/policy-rc.d ]; then
	printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
	chmod 755 /usr/sbin/policy-rc.d
	trap 'rm -f /usr/sbin/policy-rc.d' EXIT # ours: gone however the install ends
fi
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
	systemctl disable --now libvirtd virtlogd >/dev/null 2>&1 || true
fi
