#!/bin/bash
# The reference derivative OS: a systemd Debian 12 built from container
# layers, and the disk it boots from under BIOS and UEFI (see
# docs/derivative-os.md, which walks through it step by step).
#
#   mkos.sh foundation
#       Builds layer 1, the foundation, with mmdebstrap from Debian's archive:
#       minbase + systemd-sysv, linux-image-amd64, initramfs-tools,
#       e2fsprogs, ca-certificates, iproute2; systemd-networkd on DHCP.
#       Prints the path of the tarball. Packages are kept in
#       $SLUICE_OS_CACHE/debs and the tarball in $SLUICE_OS_CACHE, keyed by
#       this script's foundation recipe: a warm run downloads nothing.
#   mkos.sh sluice-layer OUT AGENT_BIN AGENT_TOML KEYS
#       Layer 2, the Sluice layer, as folder OUT: the agent, its two systemd
#       units enabled, mount units for the ESP (/boot/efi) and the data
#       partition (/var/lib/sluice, the agent's state_dir), the agent's
#       configuration and trusted keys, /etc/mke2fs.conf.
#   mkos.sh deb PACKAGE
#       Prints the path of PACKAGE's .deb for bookworm, fetched once with
#       `apt-get download` into $SLUICE_OS_CACHE/debs (what a derivative's
#       customization layer installs).
#   mkos.sh disk OUT ROOTFS
#       A raw GPT disk that boots under SeaBIOS and OVMF: p1 BIOS boot
#       (GRUB's i386-pc core), p2 ESP (FAT: GRUB for x86_64-efi as
#       /EFI/BOOT/BOOTX64.EFI, /grub/grub.cfg, the shipped
#       agent/grub/sluice.cfg, the grubenv), p3 slot A (ext4 made from folder
#       ROOTFS, the factory image), p4 slot B (empty), p5 the data partition
#       (empty ext4). Partitions are found by their GPT names: esp,
#       sluice-a, sluice-b, sluice-data.
#
# Needs: mmdebstrap, grub-pc-bin, grub-efi-amd64-bin, grub-common, parted,
# dosfstools, mtools, e2fsprogs (scripts/test installs them). No loop
# devices and no mounts: the disk is assembled from files with dd.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
CACHE=${SLUICE_OS_CACHE:-$HOME/.cache/sluice-os}
MIRROR=${SLUICE_OS_MIRROR:-http://deb.debian.org/debian}
SECURITY=${SLUICE_OS_SECURITY_MIRROR:-http://deb.debian.org/debian-security}

# Partition sizes in MiB. A slot holds one unpacked image (about 160 MB);
# the data partition holds the agent's staging folder for one, too.
BIOS_MB=1
ESP_MB=32
SLOT_MB=512
DATA_MB=512

die() { echo "mkos.sh: $*" >&2; exit 1; }

# shellcheck source=scripts/abdisk.sh
. "$REPO/scripts/abdisk.sh"

# The foundation's recipe. Kernel modules are limited to what a virtio
# machine needs (virtio, ext4, FAT, NLS, efivarfs): the full set is 390 MB
# that every slot write would carry. Documentation, manual pages and
# translations are left out for the same reason; udev's hardware database
# too (it only names devices).
PACKAGES=systemd-sysv,linux-image-amd64,initramfs-tools,e2fsprogs,ca-certificates,iproute2
foundation_args() {
    local m=/lib/modules/*/kernel
    printf '%s\n' \
        --variant=minbase \
        --include="$PACKAGES" \
        --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
        --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        --dpkgopt='path-exclude=/lib/udev/hwdb.d/*' \
        --dpkgopt="path-exclude=$m/drivers/*" \
        --dpkgopt="path-exclude=$m/sound/*" \
        --dpkgopt="path-exclude=$m/net/*" \
        --dpkgopt="path-exclude=$m/fs/*" \
        --dpkgopt="path-exclude=$m/lib/test_*" \
        --dpkgopt="path-include=$m/drivers/virtio/*" \
        --dpkgopt="path-include=$m/drivers/block/virtio_blk.ko" \
        --dpkgopt="path-include=$m/drivers/net/virtio_net.ko" \
        --dpkgopt="path-include=$m/drivers/net/net_failover.ko" \
        --dpkgopt="path-include=$m/net/core/failover.ko" \
        --dpkgopt="path-include=$m/drivers/char/hw_random/virtio-rng.ko" \
        --dpkgopt="path-include=$m/fs/ext4/*" \
        --dpkgopt="path-include=$m/fs/jbd2/*" \
        --dpkgopt="path-include=$m/fs/mbcache.ko" \
        --dpkgopt="path-include=$m/fs/fat/*" \
        --dpkgopt="path-include=$m/fs/nls/*" \
        --dpkgopt="path-include=$m/fs/efivarfs/*" \
        --setup-hook='mkdir -p "$1/etc" && echo "link_in_boot = yes" >"$1/etc/kernel-img.conf"' \
        --customize-hook='echo sluice-os >"$1/etc/hostname"' \
        --customize-hook='printf "[Match]\nName=en* eth*\n\n[Network]\nDHCP=ipv4\n" >"$1/etc/systemd/network/20-wired.network"' \
        --customize-hook='chroot "$1" systemctl enable systemd-networkd.service' \
        --customize-hook='rm -f "$1"/boot/*.old "$1/etc/machine-id" && touch "$1/etc/machine-id"'
}

foundation() {
    command -v mmdebstrap >/dev/null || die "mmdebstrap is missing (apt-get install mmdebstrap)"
    mkdir -p "$CACHE/debs"
    local key out
    key=$( (foundation_args; echo "$MIRROR $SECURITY") | sha256sum | cut -c1-16)
    out=$CACHE/foundation-$key.tar
    if [ ! -s "$out" ]; then
        local args=()
        mapfile -t args < <(foundation_args)
        # The downloaded packages go to and come from the cache; apt's own
        # cache inside the image is emptied by mmdebstrap afterwards.
        # A layer carries no device nodes (the agent refuses them), so the
        # tarball leaves /dev out (`output/dev`) and gets the empty /dev the
        # kernel mounts its devtmpfs on appended afterwards. (Deleting the
        # nodes with `tar --delete` instead left a corrupt end on a 140 MB
        # archive: GNU tar then lists every member and exits 2.)
        mmdebstrap "${args[@]}" --format=tar \
            --skip=essential/unlink --skip=output/dev \
            --setup-hook='mkdir -p "$1/var/cache/apt/archives/"' \
            --setup-hook="sync-in $CACHE/debs /var/cache/apt/archives/" \
            --customize-hook="sync-out /var/cache/apt/archives $CACHE/debs" \
            bookworm "$out.part" \
            "deb $MIRROR bookworm main" \
            "deb $MIRROR bookworm-updates main" \
            "deb $SECURITY bookworm-security main" >&2 || die "mmdebstrap failed"
        local empty
        empty=$(mktemp -d)
        mkdir -m 0755 "$empty/dev"
        tar --append -f "$out.part" --format=pax --numeric-owner --owner=0 --group=0 \
            --mtime=@0 -C "$empty" ./dev || die "appending /dev to the foundation failed"
        rm -rf "$empty"
        tar -tf "$out.part" >/dev/null || die "the foundation tarball does not read back"
        mv "$out.part" "$out"
    fi
    echo "$out"
}

deb() {
    local pkg=$1 found
    mkdir -p "$CACHE/debs"
    found=$(ls "$CACHE/debs/${pkg}"_*.deb 2>/dev/null | sort -V | tail -1 || true)
    if [ -z "$found" ]; then
        (cd "$CACHE/debs" && apt-get download "$pkg" >&2) || die "apt-get download $pkg failed (apt-get update?)"
        found=$(ls "$CACHE/debs/${pkg}"_*.deb | sort -V | tail -1)
    fi
    echo "$found"
}

sluice_layer() {
    local out=$1 agent=$2 toml=$3 keys=$4
    [ -x "$agent" ] || die "no agent binary at $agent"
    rm -rf "$out"
    local units=$out/usr/lib/systemd/system etc=$out/etc/systemd/system
    install -D -m 0755 "$agent" "$out/usr/bin/sluice-agent"
    install -D -m 0644 "$REPO/agent/systemd/sluice-agent.service" "$units/sluice-agent.service"
    install -D -m 0644 "$REPO/agent/systemd/sluice-boot-assessment.service" "$units/sluice-boot-assessment.service"
    install -D -m 0600 "$toml" "$out/etc/sluice/agent.toml"
    install -D -m 0644 "$keys" "$out/etc/sluice/keys.json"
    install -D -m 0644 /etc/mke2fs.conf "$out/etc/mke2fs.conf"
    mkdir -p "$out/var/lib/sluice" "$out/boot/efi" "$etc/multi-user.target.wants" "$etc/local-fs.target.wants"
    # The partitions the agent needs, by GPT name (what `systemctl enable`
    # of these units would link).
    cat >"$etc/var-lib-sluice.mount" <<'EOF'
[Unit]
Description=Sluice data partition (the agent's state, kept across slots)

[Mount]
What=/dev/disk/by-partlabel/sluice-data
Where=/var/lib/sluice
Type=ext4
Options=nodev,nosuid,noexec

[Install]
WantedBy=local-fs.target
EOF
    cat >"$etc/boot-efi.mount" <<'EOF'
[Unit]
Description=EFI system partition (GRUB and its environment block)

[Mount]
What=/dev/disk/by-partlabel/esp
Where=/boot/efi
Type=vfat
Options=umask=0077,nodev,nosuid,noexec

[Install]
WantedBy=local-fs.target
EOF
    local u
    for u in var-lib-sluice.mount boot-efi.mount; do
        ln -s "../$u" "$etc/local-fs.target.wants/$u"
    done
    for u in sluice-agent.service sluice-boot-assessment.service; do
        ln -s "/usr/lib/systemd/system/$u" "$etc/multi-user.target.wants/$u"
        mkdir -p "$etc/$u.d"
        printf '[Unit]\nRequiresMountsFor=/var/lib/sluice /boot/efi\n' >"$etc/$u.d/mounts.conf"
    done
}

# Eight little-endian bytes of $1, as printf escapes.
le64() {
    local i
    for i in 0 1 2 3 4 5 6 7; do printf '\\x%02x' $((($1 >> (8 * i)) & 255)); done
}

disk() {
    local out=$1 rootfs=$2
    [ -d "$rootfs" ] || die "no root folder $rootfs"
    local work
    work=$(mktemp -d)
    trap 'rm -rf "$work"' RETURN
    disk_layout "$out" "$BIOS_MB" "$ESP_MB" "$SLOT_MB" "$SLOT_MB" "$DATA_MB"
    disk_partition "$out" gpt bios-boot "esp fat16" "sluice-a ext4" "sluice-b ext4" "sluice-data ext4"
    parted -s "$out" set 1 bios_grub on set 2 esp on

    # BIOS: boot.img's code in sector 0 (parted's protective MBR stays),
    # pointed at the core image in the BIOS boot partition, whose first
    # sector (diskboot) is pointed at the rest of it: what grub-bios-setup
    # writes, without a device to write to.
    # shellcheck disable=SC2086
    grub-mkimage -O i386-pc -o "$work/core.img" -p '(hd0,gpt2)/grub' biosdisk part_gpt $GRUB_MODULES
    [ "$(stat -c %s "$work/core.img")" -le $((BIOS_MB * 1024 * 1024)) ] || die "core.img too large"
    printf "$(le64 $((PART[1] + 1)))" | dd of="$work/core.img" bs=1 seek=$((512 - 12)) conv=notrunc status=none
    dd if=/usr/lib/grub/i386-pc/boot.img of="$out" bs=440 count=1 conv=notrunc status=none
    printf "$(le64 "${PART[1]}")" | dd of="$out" bs=1 seek=$((0x5c)) conv=notrunc status=none
    disk_put "$out" 1 "$work/core.img"

    # UEFI: the removable-media path OVMF boots without boot entries.
    # shellcheck disable=SC2086
    grub-mkimage -O x86_64-efi -o "$work/BOOTX64.EFI" -p '(hd0,gpt2)/grub' part_gpt $GRUB_MODULES
    disk_grub_fat "$work/esp" ESP "$ESP_MB" <<'EOF'
set sluice_part_A=(hd0,gpt3)
set sluice_part_B=(hd0,gpt4)
set sluice_root_A=PARTLABEL=sluice-a
set sluice_root_B=PARTLABEL=sluice-b
set sluice_cmdline="console=ttyS0,115200 rw panic=5 loglevel=4"
EOF
    mmd -i "$work/esp" ::/EFI ::/EFI/BOOT
    mcopy -i "$work/esp" "$work/BOOTX64.EFI" ::/EFI/BOOT/
    disk_put "$out" 2 "$work/esp"

    disk_ext4 "$out" 3 "$SLOT_MB" -E root_owner=0:0 -d "$rootfs"
    disk_ext4 "$out" 5 "$DATA_MB" -L sluice-data
}

cmd=${1:-}
shift || true
case $cmd in
foundation) [ $# -eq 0 ] || die "usage: foundation"; foundation ;;
deb) [ $# -eq 1 ] || die "usage: deb PACKAGE"; deb "$1" ;;
sluice-layer) [ $# -eq 4 ] || die "usage: sluice-layer OUT AGENT_BIN AGENT_TOML KEYS"; sluice_layer "$@" ;;
disk) [ $# -eq 2 ] || die "usage: disk OUT ROOTFS"; disk "$@" ;;
*) die "usage: mkos.sh foundation | deb PACKAGE | sluice-layer OUT AGENT_BIN AGENT_TOML KEYS | disk OUT ROOTFS" ;;
esac
