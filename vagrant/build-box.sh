#!/usr/bin/env bash
# Build a local Debian 12 (bookworm) Vagrant box for the libvirt provider, from Debian
# packages only, and the offline install media the VMs are provisioned from.
#
#   vagrant/build-box.sh [CACHE_DIR]        (default: vagrant/.cache)
#
# Writes into CACHE_DIR:
#   box/dabba-bookworm.box   the box (qcow2 root filesystem, no bootloader)
#   box/vmlinuz, box/initrd.img   the box's kernel, booted directly by QEMU
#   debs/                    the .deb files provisioning installs (bcc, kernel headers for the
#                            box's kernel, venv, socat, tcpdump) with their dependencies
# (the wheelhouse is fetched by vagrant/fetch-wheels.sh: it needs the project's wheel).
#
# How (../shared/notes/vagrant-on-this-machine.md): debootstrap a minbase rootfs with a
# kernel, systemd, udev, sshd, sudo, python3; user `vagrant` with Vagrant's insecure key (from
# Debian's vagrant package); an ext4 image made from the folder (mkfs.ext4 -d, no loop mount),
# converted to qcow2. The .debs come from `apt-get install --download-only` inside the same
# rootfs, so they are exactly what a VM of this box lacks. Re-running rebuilds.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="$(mkdir -p "${1:-$here/.cache}" && cd "${1:-$here/.cache}" && pwd)"
mirror="${DABBA_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
work="$cache/box-build"
root="$work/rootfs"
log() { printf 'build-box: %s\n' "$*"; }

[ "$(id -u)" -eq 0 ] || { echo "build-box: must run as root (debootstrap, chroot)" >&2; exit 1; }
for tool in debootstrap mkfs.ext4 qemu-img; do
	command -v "$tool" >/dev/null || { echo "build-box: $tool is missing (bash vagrant/setup-host.sh)" >&2; exit 1; }
done
key="$(find /usr/share/rubygems-integration /usr/lib/ruby /usr/share/vagrant -name vagrant.pub -path '*keys*' 2>/dev/null | head -n 1 || true)"
[ -n "$key" ] || { echo "build-box: Vagrant's insecure public key (keys/vagrant.pub) not found; is vagrant installed?" >&2; exit 1; }

cleanup() { # every layer: a proc that debootstrap could not unmount may lie under ours
	for m in proc sys dev/pts dev; do
		for _ in 1 2 3 4; do
			mountpoint -q "$root/$m" 2>/dev/null || break
			umount -l "$root/$m" || true
		done
	done
}
trap cleanup EXIT
cleanup
rm -rf "$work"
mkdir -p "$work" "$cache/box" "$cache/debs"

t0=$(date +%s)
log "debootstrap bookworm (minbase + kernel, systemd, sshd, sudo, python3) from $mirror"
debootstrap --variant=minbase \
	--include=linux-image-amd64,systemd-sysv,udev,dbus,kmod,openssh-server,sudo,iproute2,iputils-ping,procps,python3,ca-certificates,curl,less \
	bookworm "$root" "$mirror" >"$work/debootstrap.log" 2>&1 ||
	{ tail -n 20 "$work/debootstrap.log" >&2; exit 1; }

log "configuring: user vagrant, sshd, systemd-networkd (DHCP), serial console"
cat >"$root/etc/apt/sources.list" <<EOF
deb http://deb.debian.org/debian bookworm main
deb http://deb.debian.org/debian bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
EOF
echo "/dev/vda / ext4 rw,relatime 0 1" >"$root/etc/fstab"
echo "dabba-box" >"$root/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 dabba-box\n' >"$root/etc/hosts"
# Vagrant writes 50-vagrant-<if>.network for private networks; this one must sort after it
cat >"$root/etc/systemd/network/99-dhcp.network" <<'EOF'
[Match]
Name=en* eth*

[Network]
DHCP=ipv4

[DHCPv4]
ClientIdentifier=mac
EOF
# network-online.target (which the dabba units order after) waits for any one link, not for a
# private network that has no DHCP server
mkdir -p "$root/etc/systemd/system/systemd-networkd-wait-online.service.d"
printf '[Service]\nExecStart=\nExecStart=/lib/systemd/systemd-networkd-wait-online --any --timeout=30\n' \
	>"$root/etc/systemd/system/systemd-networkd-wait-online.service.d/any.conf"
chroot "$root" systemctl enable systemd-networkd systemd-resolved >/dev/null 2>&1 ||
	chroot "$root" systemctl enable systemd-networkd >/dev/null
chroot "$root" systemctl enable serial-getty@ttyS0 >/dev/null 2>&1 || true
chroot "$root" useradd -m -s /bin/bash -G sudo vagrant
echo 'vagrant:vagrant' | chroot "$root" chpasswd
echo 'vagrant ALL=(ALL) NOPASSWD:ALL' >"$root/etc/sudoers.d/vagrant"
chmod 0440 "$root/etc/sudoers.d/vagrant"
install -d -m 0700 -o 1000 -g 1000 "$root/home/vagrant/.ssh"
install -m 0600 -o 1000 -g 1000 "$key" "$root/home/vagrant/.ssh/authorized_keys"
echo 'UseDNS no' >"$root/etc/ssh/sshd_config.d/vagrant.conf"
# Every VM of this box must be a machine of its own. With one machine-id they all sent dnsmasq
# one DHCP client identifier (networkd derives it from the machine-id), so each new VM took the
# previous one's address and vagrant-libvirt called the earlier ones "inaccessible". DHCP now
# identifies by MAC (above); the Vagrantfile gives each VM its own machine-id on the kernel
# command line (an empty one would make the first boot enable every unit by preset); the SSH
# host keys are made at first boot, not shared by every VM of the box.
rm -f "$root"/etc/ssh/ssh_host_*
cat >"$root/etc/systemd/system/ssh-host-keys.service" <<'EOF'
[Unit]
Description=SSH host keys of this machine (made at first boot)
Before=ssh.service
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A

[Install]
WantedBy=multi-user.target
EOF
chroot "$root" systemctl enable ssh-host-keys.service >/dev/null 2>&1

log "downloading the install media for provisioning (.deb files) inside the rootfs"
kver="$(basename "$(ls -d "$root"/lib/modules/* | sort -V | tail -n 1)")"
mount -t proc proc "$root/proc"
mount --bind /dev "$root/dev"
chroot "$root" apt-get update -qq
chroot "$root" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --download-only \
	--no-install-recommends python3-venv python3-bpfcc libbpfcc bpftool \
	"linux-headers-$kver" socat tcpdump >/dev/null
rm -f "$cache/debs/"*.deb
mv "$root"/var/cache/apt/archives/*.deb "$cache/debs/"
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/*
cleanup
log "$(ls "$cache/debs" | wc -l) .deb files for kernel $kver in $cache/debs"

cp "$root/boot/vmlinuz-$kver" "$cache/box/vmlinuz"
cp "$root/boot/initrd.img-$kver" "$cache/box/initrd.img"
chmod 0644 "$cache/box/vmlinuz" "$cache/box/initrd.img"
echo "$kver" >"$cache/box/kernel-release"

log "making the image: ext4 from the folder, then qcow2"
truncate -s 4G "$work/root.raw"
mkfs.ext4 -q -F -L root -d "$root" "$work/root.raw"
qemu-img convert -O qcow2 "$work/root.raw" "$work/box.img"
rm -f "$work/root.raw"
echo '{"provider":"libvirt","format":"qcow2","virtual_size":4}' >"$work/metadata.json"
cat >"$work/Vagrantfile" <<'EOF'
Vagrant.configure("2") do |config|
  config.vm.provider :libvirt do |lv|
    lv.driver = "qemu"
  end
end
EOF
tar -C "$work" -cf "$cache/box/dabba-bookworm.box" box.img metadata.json Vagrantfile
sha256sum <"$here/build-box.sh" | cut -d" " -f1 >"$cache/box/recipe.sha256" # run-test.sh: rebuild when it changes
rm -rf "$work"
log "box ready: $cache/box/dabba-bookworm.box (kernel $kver) in $(($(date +%s) - t0))s"
