#!/bin/sh
# mmdebstrap --customize-hook for the local debian/trixie64 box (scripts/check-vagrant-vm.sh):
# what a Vagrant base box needs on top of the packages. Runs outside the chroot; $1 is its root.
#   BHP_BOX_PUBKEY  Vagrant's public insecure key (the vagrant package ships it)
set -eu
root=$1
[ -s "${BHP_BOX_PUBKEY:-}" ] || { echo "box-customize: BHP_BOX_PUBKEY names no key file" >&2; exit 1; }

# The vagrant user: sudo without a password, Vagrant's insecure key (replaced on first `vagrant up`).
chroot "$root" useradd --create-home --shell /bin/bash vagrant
printf 'vagrant ALL=(ALL) NOPASSWD: ALL\nDefaults:vagrant !requiretty\n' >"$root/etc/sudoers.d/vagrant"
chmod 0440 "$root/etc/sudoers.d/vagrant"
install -d -m 0700 "$root/home/vagrant/.ssh"
install -m 0600 "$BHP_BOX_PUBKEY" "$root/home/vagrant/.ssh/authorized_keys"
chroot "$root" chown -R vagrant:vagrant /home/vagrant/.ssh

# DHCP on whatever the NIC is called (systemd-networkd is part of trixie's systemd). No resolver:
# the check's guest reaches the registries only through a proxy, so a lookup should fail at once
# rather than wait on a DNS server that cannot answer.
cat >"$root/etc/systemd/network/20-dhcp.network" <<'NET'
[Match]
Name=en* eth*

[Network]
DHCP=yes
NET
chroot "$root" systemctl enable systemd-networkd.service
: >"$root/etc/resolv.conf"

# One ext4 file system on the whole disk, no partition table, no boot loader: the box's
# Vagrantfile boots the kernel and initrd directly (root=/dev/vda).
echo '/dev/vda / ext4 errors=remount-ro 0 1' >"$root/etc/fstab"
echo trixie >"$root/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\ttrixie\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$root/etc/hosts"

# A fresh machine-id on every boot of a copy (systemd makes one when the file is empty).
: >"$root/etc/machine-id"

# The kernel and initrd, for the box to ship beside its disk image.
kernel=$(ls "$root"/boot/vmlinuz-* | sort -V | tail -n 1)
initrd="$root/boot/initrd.img-${kernel##*/vmlinuz-}"
[ -f "$initrd" ] || { echo "box-customize: no initrd for $kernel" >&2; exit 1; }
cp "$kernel" "${BHP_BOX_OUT:?}/vmlinuz"
cp "$initrd" "$BHP_BOX_OUT/initrd.img"
