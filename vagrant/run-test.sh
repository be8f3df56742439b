#!/usr/bin/env bash
# make vagrant-test: three real VMs (control, node1, node2), dabbawala installed through the
# systemd path from offline media, an end-to-end check across them (vagrant/e2e.py), destroy.
#
# Everything -- libvirtd, virtlogd, libvirt's networks and dnsmasq, the VMs, Vagrant -- runs
# inside a network namespace this run creates and removes, so no VM address exists on the host.
# What the run leaves: vagrant/.cache (box, .debs, wheelhouse: reused by the next run).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
cache="${DABBA_CACHE:-$here/.cache}"
py="$repo/.venv/bin/python"
run_id="dvt$(od -An -N3 -tx1 /dev/urandom | tr -d ' \n')"
ns="$run_id"
log() { printf 'vagrant-test: %s\n' "$*"; }
t0=$(date +%s)
lap() { log "$1 ($(($(date +%s) - t0))s since the start)"; }

[ "$(id -u)" -eq 0 ] || { echo "vagrant-test: must run as root" >&2; exit 1; }

# ---- host tools, box, install media -----------------------------------------------------
bash "$here/setup-host.sh"
recipe="$(sha256sum <"$here/build-box.sh" | cut -d' ' -f1)"
if [ ! -s "$cache/box/dabba-bookworm.box" ] || [ ! -d "$cache/debs" ] ||
	[ "$(cat "$cache/box/recipe.sha256" 2>/dev/null)" != "$recipe" ]; then
	bash "$here/build-box.sh" "$cache"
else
	log "box: $cache/box/dabba-bookworm.box (kernel $(cat "$cache/box/kernel-release"))"
fi
bash "$here/fetch-wheels.sh" "$cache"
lap "box and install media ready"

# ---- a network namespace with its own libvirt -------------------------------------------
out="$cache/last-run" # logs, capture, journals and report of the last run (kept)
kvm_mode=""
libvirtd_pid="" virtlogd_pid="" media_pid=""
virsh_() { timeout 60 virsh -q -c qemu:///system "$@"; }
cleanup() {
	set +e
	log "cleaning up"
	if [ -n "${VAGRANT_CWD:-}" ] && [ -d "$cache/run/.vagrant" ]; then
		for vm in control node1 node2; do # the journals of whatever ran (kept in $out)
			timeout 60 nsenter --net="/run/netns/$ns" vagrant ssh "$vm" -c \
				"sudo journalctl -u 'dabba-*' --no-pager -n 400" >"$out/journal-$vm.txt" 2>/dev/null
		done
		timeout 300 nsenter --net="/run/netns/$ns" vagrant destroy -f >/dev/null 2>&1
	fi
	if [ -n "$libvirtd_pid" ]; then
		# what this run defined in libvirt: its VMs, networks and pool (libvirt keeps them in
		# /etc/libvirt, which outlives the daemon)
		for d in vagrant_control vagrant_node1 vagrant_node2; do
			virsh_ destroy "$d" >/dev/null 2>&1
			virsh_ undefine "$d" --remove-all-storage >/dev/null 2>&1
		done
		for n in vagrant-libvirt "$net_name"; do
			virsh_ net-destroy "$n" >/dev/null 2>&1
			virsh_ net-undefine "$n" >/dev/null 2>&1
		done
		virsh_ pool-destroy "$run_id" >/dev/null 2>&1
		virsh_ pool-undefine "$run_id" >/dev/null 2>&1
	fi
	[ -n "$media_pid" ] && kill "$media_pid" 2>/dev/null
	for pid in $libvirtd_pid $virtlogd_pid; do
		kill "$pid" 2>/dev/null
	done
	sleep 1
	for pid in $libvirtd_pid $virtlogd_pid; do
		kill -9 "$pid" 2>/dev/null
	done
	# qemu processes of this run only (their command line names this run's pool)
	pkill -9 -f "qemu-system.*$run_id" 2>/dev/null
	ip netns del "$ns" 2>/dev/null
	if [ -n "$kvm_mode" ]; then
		chown "$kvm_owner" /dev/kvm && chmod "$kvm_mode" /dev/kvm
	fi
	rm -rf "$cache/run" "$cache/join" "$cache/pool-$run_id"
	log "done: nothing of run $run_id is left (cache kept in $cache)"
}
rm -rf "$out" && mkdir -p "$out"
trap cleanup EXIT
trap 'exit 130' INT TERM
net_name="dabba-192-168-56"  # the private network vagrant-libvirt defines (Vagrantfile)

ip netns add "$ns"
ip -n "$ns" link set lo up
if [ -e /dev/kvm ]; then
	# libvirt re-probes QEMU on every call when it cannot open /dev/kvm (320 s instead of 60 s
	# to bring up two VMs); the VMs themselves use TCG (the host's kvm runs only PVM guests)
	kvm_mode="$(stat -c %a /dev/kvm)" kvm_owner="$(stat -c %u:%g /dev/kvm)"
	getent group kvm >/dev/null || groupadd -r kvm
	chgrp kvm /dev/kvm && chmod 0660 /dev/kvm
fi
mkdir -p /run/libvirt
in_ns() { nsenter --net="/run/netns/$ns" "$@"; }
in_ns virtlogd -d
virtlogd_pid="$(pgrep -n -x virtlogd)"
in_ns libvirtd -d
for _ in $(seq 1 100); do
	[ -S /run/libvirt/libvirt-sock ] && virsh -c qemu:///system version >/dev/null 2>&1 && break
	sleep 0.1
done
libvirtd_pid="$(pgrep -n -x libvirtd)"
virsh -c qemu:///system version >/dev/null || { echo "vagrant-test: libvirtd did not start" >&2; exit 1; }
mkdir -p "$cache/pool-$run_id" "$cache/run"
virsh -q -c qemu:///system pool-define-as "$run_id" dir --target "$cache/pool-$run_id" >/dev/null
virsh -q -c qemu:///system pool-start "$run_id" >/dev/null
lap "libvirtd $libvirtd_pid and virtlogd $virtlogd_pid in netns $ns; storage pool $run_id"

# the install media, served to the VMs only (this namespace's management network)
media="$cache/run/media"
mkdir -p "$media"
ln -sfn "$cache/debs" "$media/debs"
ln -sfn "$cache/wheelhouse" "$media/wheelhouse"
(cd "$cache/debs" && dpkg-scanpackages --multiversion . /dev/null 2>/dev/null >Packages)
nsenter --net="/run/netns/$ns" "$py" -m http.server 8111 --bind 0.0.0.0 --directory "$media" >"$cache/run/media.log" 2>&1 &
media_pid=$!
export DABBA_MEDIA_URL="http://192.168.121.1:8111"

# ---- Vagrant ------------------------------------------------------------------------------
export VAGRANT_CWD="$here" VAGRANT_HOME="$cache/vagrant.d" VAGRANT_DOTFILE_PATH="$cache/run/.vagrant"
export DABBA_LOCAL_BOX=1 DABBA_OFFLINE=1 DABBA_CACHE="$cache" DABBA_POOL="$run_id"
export VAGRANT_DEFAULT_PROVIDER=libvirt VAGRANT_CHECKPOINT_DISABLE=1 VAGRANT_NO_COLOR=1
if ! vagrant box list 2>/dev/null | grep -q '^dabba/bookworm-local '; then
	vagrant box add -f --name dabba/bookworm-local "$cache/box/dabba-bookworm.box" >/dev/null
fi
# a box rebuilt since it was added must be added again
if [ "$cache/box/dabba-bookworm.box" -nt "$VAGRANT_HOME/boxes" ]; then
	vagrant box add -f --name dabba/bookworm-local "$cache/box/dabba-bookworm.box" >/dev/null
	touch "$VAGRANT_HOME/boxes"
fi

in_ns vagrant up control >"$out/up-control.log" 2>&1 || { tail -n 40 "$out/up-control.log"; exit 1; }
lap "control VM up and provisioned"
in_ns bash "$here/join.sh"
lap "join tokens for node1, node2 and the control plane's CA fetched"

# both at once (vagrant-libvirt's default): one TCG vCPU each on this 2-core machine
in_ns vagrant up node1 node2 >"$out/up-nodes.log" 2>&1 || { tail -n 60 "$out/up-nodes.log"; exit 1; }
lap "node1 and node2 up, provisioned, agents and tunnels started by systemd"

in_ns vagrant ssh-config control node1 node2 >"$cache/run/ssh-config" 2>"$out/ssh-config.err" ||
	{ cat "$out/ssh-config.err" >&2; exit 1; }
in_ns "$py" "$here/e2e.py" --ssh-config "$cache/run/ssh-config" --netns "$ns" \
	--box-kernel "$(cat "$cache/box/kernel-release")" --out "$out"
lap "end-to-end checks passed"
in_ns vagrant destroy -f >/dev/null
lap "VMs destroyed"
