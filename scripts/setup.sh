#!/usr/bin/env bash
# dabbawala set-up: idempotent, for a fresh Debian 12 machine as root.
#
#   1. Debian packages: bcc (python3-bpfcc, libbpfcc), iproute2, and the real
#      clients and tools the tests use.
#   2. Kernel headers for bcc: the running kernel's own when Debian packages
#      them; otherwise (and only then) the distribution's generic headers are
#      linked in as /lib/modules/$(uname -r)/{build,source}, with a warning.
#   3. bpffs mounted at /sys/fs/bpf.
#   4. A virtual environment (.venv) on Debian's python3 that can import bcc
#      (bcc is not on PyPI: its pure-Python module is linked in from
#      /usr/lib/python3/dist-packages), with the pinned Python dependencies.
#
# Re-running it changes nothing that is already in place.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${DABBA_VENV:-$here/.venv}"
log() { printf 'setup: %s\n' "$*"; }
apt_updated=0
apt_update_once() {
	if [ "$apt_updated" -eq 0 ]; then
		apt-get update -qq
		apt_updated=1
	fi
}
warn() { printf '\033[33msetup: WARNING: %s\033[0m\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
	echo "setup: must run as root (it installs Debian packages and mounts bpffs)" >&2
	exit 1
fi

# ---- 1. Debian packages -----------------------------------------------------
apt_pkgs=(
	python3-bpfcc libbpfcc bpftool # bcc and an independent view of the kernel's BPF objects
	python3-venv python3-dev       # the virtual environment
	iproute2 iputils-ping procps psmisc         # ip netns/link, ps, fuser
	curl openssl wrk iperf3 nghttp2-client tcpdump socat
	iptables                       # the sidecar baseline's capture (REDIRECT), in bench pods only
	nginx-light                    # the benchmarks' and load tests' HTTP server (run in pods only)
	prometheus                     # promtool for deploy/'s rules; a real server scrapes the lab
	clang-format make git ca-certificates
)
missing=()
for p in "${apt_pkgs[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	log "installing Debian packages: ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt_update_once
	# Packages with services (nginx) must not start one on the host: we run them in pods only.
	if [ ! -e /usr/sbin/policy-rc.d ]; then
		printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
		chmod 755 /usr/sbin/policy-rc.d
		trap 'rm -f /usr/sbin/policy-rc.d' EXIT # ours: gone however the install ends
	fi
	apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
	for svc in nginx-light:nginx prometheus:prometheus; do
		if printf '%s\n' "${missing[@]}" | grep -qx "${svc%%:*}" && command -v systemctl >/dev/null &&
			[ -d /run/systemd/system ]; then
			systemctl disable --now "${svc#*:}" >/dev/null 2>&1 || true
			log "${svc#*:} installed for the lab and tests; its host service is disabled"
		fi
	done
else
	log "Debian packages: all present"
fi

# ---- 2. kernel headers --------------------------------------------------------
krel="$(uname -r)"
mod="/lib/modules/$krel"
if [ -e "$mod/build/include/linux/kconfig.h" ] || [ -e "$mod/build/include/generated/autoconf.h" ]; then
	log "kernel headers for $krel: present ($(readlink -f "$mod/build"))"
else
	export DEBIAN_FRONTEND=noninteractive
	apt_update_once
	if apt-cache show "linux-headers-$krel" >/dev/null 2>&1; then
		log "installing the running kernel's own headers: linux-headers-$krel"
		apt-get install -y -qq "linux-headers-$krel" >/dev/null
	else
		# No headers are packaged for this kernel. bcc only needs kernel
		# headers for the types of the BPF UAPI and a few kernel structs,
		# which are stable; Debian's generic headers compile and load our
		# programs on this kernel. The running kernel's BTF is what the
		# verifier checks against.
		dpkg-query -W -f='${Status}' linux-headers-amd64 2>/dev/null | grep -q 'install ok installed' ||
			apt-get install -y -qq linux-headers-amd64 >/dev/null
		generic="$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)"
		common="${generic%-amd64}-common"
		if [ -z "$generic" ] || [ ! -d "$common" ]; then
			echo "setup: no kernel headers for $krel and no generic Debian headers found" >&2
			exit 1
		fi
		warn "no headers are packaged for the running kernel $krel;"
		warn "falling back to the distribution's generic headers: $mod/build -> $generic, $mod/source -> $common"
		mkdir -p "$mod"
		ln -sfn "$generic" "$mod/build"
		ln -sfn "$common" "$mod/source"
	fi
fi

# ---- 3. bpffs -------------------------------------------------------------------
if ! mountpoint -q /sys/fs/bpf || [ "$(stat -f -c %T /sys/fs/bpf)" != "bpf_fs" ]; then
	log "mounting bpffs at /sys/fs/bpf"
	mkdir -p /sys/fs/bpf
	mount -t bpf bpf /sys/fs/bpf
fi

# ---- 4. virtual environment -------------------------------------------------------
py=/usr/bin/python3
if [ ! -x "$venv/bin/python" ]; then
	log "creating virtual environment $venv on $($py --version)"
	$py -m venv "$venv"
fi
site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
if [ ! -e "$site/bcc" ]; then
	log "linking Debian's bcc module into the virtual environment"
	ln -sfn /usr/lib/python3/dist-packages/bcc "$site/bcc"
fi
stamp="$venv/.requirements.sha256"
want="$(cat "$here/requirements.txt" "$here/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
	log "installing Python dependencies (pinned in requirements.txt)"
	"$venv/bin/pip" install -q --disable-pip-version-check -r "$here/requirements.txt"
	"$venv/bin/pip" install -q --disable-pip-version-check --no-deps -e "$here"
	echo "$want" >"$stamp"
else
	log "Python dependencies: up to date"
fi
"$venv/bin/python" -c 'import bcc, agent' || {
	echo "setup: the virtual environment cannot import bcc and agent" >&2
	exit 1
}
log "ready: $venv/bin/dabba"
