#!/bin/sh
# Provision one VM the way a user installs dabbawala on a Debian host with systemd:
#   1. Debian packages with apt: bcc (python3-bpfcc), the running kernel's headers, python3-venv
#      (offline: from the .debs the host fetched, served as an apt repository)
#   2. a venv in /opt/dabba that sees Debian's bcc, and the project's wheel
#      (offline: pip --no-index from the host's wheelhouse)
#   3. `dabba install systemd` for the role, which writes the units and starts them.
#
#   provision.sh control IP MEDIA_URL
#   provision.sh node IP MEDIA_URL CONTROL_IP
# MEDIA_URL: "-" installs from Debian and PyPI (internet); else the host's media over HTTP:
# MEDIA_URL/debs (an apt repository of the .debs it fetched) and MEDIA_URL/wheelhouse.
set -eu
role="$1" ip="$2" media_url="$3" control="${4:-}"
media=/tmp/dabba-media
say() { printf 'provision(%s): %s\n' "$(hostname)" "$*"; }
t0=$(date +%s)

if [ "$role" = control ]; then
	pkgs="python3-venv" # the control plane needs no bcc
else
	pkgs="python3-venv python3-bpfcc libbpfcc bpftool linux-headers-$(uname -r) socat tcpdump"
fi
export DEBIAN_FRONTEND=noninteractive
if [ "$media_url" != - ]; then
	say "installing from the host's .debs ($media_url/debs): $pkgs"
	echo "deb [trusted=yes] $media_url/debs ./" >/etc/apt/sources.list.d/dabba-media.list
	only_media="-o Dir::Etc::sourcelist=sources.list.d/dabba-media.list -o Dir::Etc::sourceparts=-"
	# shellcheck disable=SC2086
	apt-get $only_media update -qq
	# shellcheck disable=SC2086
	apt-get $only_media install -y -qq --no-install-recommends $pkgs >/tmp/apt.log 2>&1 ||
		{ tail -n 20 /tmp/apt.log; exit 1; }
else
	say "installing from Debian: $pkgs"
	apt-get update -qq
	# shellcheck disable=SC2086
	apt-get install -y -qq --no-install-recommends $pkgs >/dev/null
fi

if [ ! -x /opt/dabba/bin/python ]; then
	python3 -m venv --system-site-packages /opt/dabba
fi
if [ "$media_url" != - ]; then
	say "pip install dabbawala from the host's wheelhouse (--no-index)"
	media_host="$(echo "$media_url" | sed 's|^[a-z]*://||; s|[:/].*||')"
	/opt/dabba/bin/pip install -q --no-index --trusted-host "$media_host" \
		--find-links "$media_url/wheelhouse/" dabbawala
else
	wheel="$(ls $media/dist/dabbawala-*.whl | head -n 1)"
	say "pip install $(basename "$wheel") (dependencies from PyPI)"
	/opt/dabba/bin/pip install -q "$wheel"
fi
ln -sfn /opt/dabba/bin/dabba /usr/local/bin/dabba

case "$role" in
control)
	dabba install systemd --role control --server-name "$ip"
	for _ in $(seq 1 60); do
		[ -s /var/lib/dabba/control/ca/bundle.pem ] && break
		sleep 1
	done
	;;
node)
	# the workloads' cgroup: a slice of its own, as the kubelet's kubepods.slice
	printf '[Unit]\nDescription=workloads captured by dabbawala\n' >/etc/systemd/system/kubepods.slice
	systemctl daemon-reload
	systemctl start kubepods.slice
	mkdir -p /sys/fs/cgroup/kubepods.slice
	dabba install systemd --control "$control" --node-name "$(hostname)" --node-address "$ip" \
		--cgroup /sys/fs/cgroup/kubepods.slice --ca-file $media/join/ca.pem \
		--token-file "$media/join/$(hostname).token"
	;;
*)
	echo "provision: unknown role $role" >&2
	exit 2
	;;
esac
say "done in $(($(date +%s) - t0))s"
