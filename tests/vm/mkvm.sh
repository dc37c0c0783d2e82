#!/bin/bash
# Builds what the QEMU tests boot, from Debian packages only, without loop
# devices, mounts or root-only tools (see tests/vm/README.md):
#
#   mkvm.sh kernel
#       Prints the folder of an unpacked Debian kernel (vmlinuz-*, modules),
#       fetched once with `apt-get download` into $SLUICE_VM_CACHE.
#   mkvm.sh rootfs OUT VERSION BEHAVIOUR AGENT_BIN
#       An "OS image" root filesystem in folder OUT: /boot/vmlinuz,
#       /boot/initrd.img (busybox, kernel modules, sluice-agent and the
#       libraries it links, mkfs.ext4, an init), /etc/os-release naming
#       VERSION. BEHAVIOUR: `ok`, `unhealthy` (its health check fails),
#       `unhealthy-slow-reboot` (the same, and the machine goes down 20 s
#       after its reboot command returned) or `crash` (its init panics the
#       kernel before the boot assessment).
#   mkvm.sh disk OUT ROOTFS PERSIST
#       A raw disk: MBR with BIOS GRUB (boot.img + grub-mkimage core), p1 FAT16
#       with /grub/grub.cfg, the shipped agent/grub/sluice.cfg and the
#       grubenv; p2 slot A (ext4 made from folder ROOTFS); p3 slot B (empty);
#       p4 ext4 made from folder PERSIST (the device's agent.toml, keys,
#       state), mounted at /persistent in the guest.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CACHE=${SLUICE_VM_CACHE:-$HOME/.cache/sluice-vm}

# Partition sizes in MiB; p1 starts at 1 MiB (GRUB's core image sits before it).
FAT_MB=16
SLOT_MB=64
PERSIST_MB=96

die() { echo "mkvm.sh: $*" >&2; exit 1; }

# shellcheck source=scripts/abdisk.sh
. "$REPO/scripts/abdisk.sh"

kernel() {
    mkdir -p "$CACHE"
    local deb
    deb=$(ls "$CACHE"/linux-image-*-amd64_*.deb 2>/dev/null | sort -V | tail -1 || true)
    if [ -z "$deb" ]; then
        local pkg
        pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')
        [ -n "$pkg" ] || die "apt knows no linux-image-amd64 (apt-get update?)"
        (cd "$CACHE" && apt-get download "$pkg" >&2) || die "apt-get download $pkg failed"
        deb=$(ls "$CACHE"/linux-image-*-amd64_*.deb | sort -V | tail -1)
    fi
    local dir=$CACHE/kernel-$(basename "$deb" .deb)
    if [ ! -e "$dir/.done" ]; then
        rm -rf "$dir"
        dpkg-deb -x "$deb" "$dir"
        local kver
        kver=$(ls "$dir/lib/modules")
        depmod -b "$dir" "$kver"
        touch "$dir/.done"
    fi
    echo "$dir"
}

# Copies an executable and every library it links (by ldd) under $1.
copy_with_libs() {
    local root=$1 bin=$2 dest=$3
    install -D -m 0755 "$bin" "$root$dest"
    ldd "$bin" | awk '/=> \// {print $3} /^\t\/lib/ {print $1}' | while read -r lib; do
        [ -e "$root$lib" ] || install -D -m 0755 "$lib" "$root$lib"
    done
}

rootfs() {
    local out=$1 version=$2 behaviour=$3 agent=$4
    case $behaviour in ok | unhealthy | unhealthy-slow-reboot | crash) ;; *) die "unknown behaviour $behaviour" ;; esac
    [ -x "$agent" ] || die "no agent binary at $agent"
    local kdir kver
    kdir=$(kernel)
    kver=$(ls "$kdir/lib/modules")
    rm -rf "$out"
    mkdir -p "$out/boot" "$out/etc"
    local work
    work=$(mktemp -d)
    trap 'rm -rf "$work"' RETURN
    local ir=$work/initrd
    mkdir -p "$ir"/{bin,sbin,usr/bin,etc/sluice-vm,proc,sys,dev,tmp,run,persistent,boot,lib/modules}

    install -m 0755 /bin/busybox "$ir/bin/busybox"
    # Every applet but mke2fs: the agent needs e2fsprogs' mkfs.ext4 -d.
    for a in $(/bin/busybox --list); do
        case $a in busybox | mke2fs | mkfs.ext2) continue ;; esac
        ln -sf busybox "$ir/bin/$a"
    done
    copy_with_libs "$ir" /usr/sbin/mke2fs /sbin/mke2fs
    ln -sf mke2fs "$ir/sbin/mkfs.ext4"
    install -m 0644 /etc/mke2fs.conf "$ir/etc/mke2fs.conf"
    copy_with_libs "$ir" "$agent" /usr/bin/sluice-agent

    # Modules in load order (modprobe's own dependency resolution), once each.
    local m
    : >"$ir/etc/sluice-vm/modules"
    for m in virtio_pci virtio_blk virtio_net virtio_rng crc32c_generic ext4 vfat nls_cp437 nls_ascii nls_utf8; do
        modprobe -d "$kdir" -S "$kver" --show-depends "$m" | awk '$1 == "insmod" {print $2}'
    done | awk '!seen[$0]++' | while read -r ko; do
        install -m 0644 "$ko" "$ir/lib/modules/$(basename "$ko")"
        basename "$ko" >>"$ir/etc/sluice-vm/modules"
    done

    echo "$version" >"$ir/etc/sluice-vm/version"
    echo "$behaviour" >"$ir/etc/sluice-vm/behaviour"
    install -m 0755 "$HERE/init" "$ir/init"
    install -m 0755 "$HERE/health" "$ir/sbin/sluice-health"
    install -m 0755 "$HERE/reboot" "$ir/sbin/sluice-reboot"
    (cd "$ir" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0 | gzip -6) >"$out/boot/initrd.img"

    install -m 0644 "$kdir"/boot/vmlinuz-* "$out/boot/vmlinuz"
    printf 'ID=sluice-vm\nNAME="Sluice test OS"\nVERSION_ID=%s\n' "$version" >"$out/etc/os-release"
}

disk() {
    local out=$1 rootfs=$2 persist=$3
    local work
    work=$(mktemp -d)
    trap 'rm -rf "$work"' RETURN
    disk_layout "$out" "$FAT_MB" "$SLOT_MB" "$SLOT_MB" "$PERSIST_MB"
    disk_partition "$out" msdos "primary fat16" "primary ext4" "primary ext4" "primary ext4"

    # BIOS GRUB: boot.img's code (not its partition table) in sector 0, the
    # core image from sector 1 on; grub-mkimage fills in core's block list.
    # shellcheck disable=SC2086
    grub-mkimage -O i386-pc -o "$work/core.img" -p '(hd0,msdos1)/grub' biosdisk part_msdos $GRUB_MODULES
    [ "$(stat -c %s "$work/core.img")" -lt $(((PART[1] - 1) * 512)) ] || die "core.img too large"
    dd if=/usr/lib/grub/i386-pc/boot.img of="$out" bs=440 count=1 conv=notrunc status=none
    dd if="$work/core.img" of="$out" bs=512 seek=1 conv=notrunc status=none

    # p1: GRUB's configuration, the shipped A/B snippet and the environment block.
    disk_grub_fat "$work/p1" SLUICEBOOT "$FAT_MB" <<'EOF'
set sluice_part_A=(hd0,msdos2)
set sluice_part_B=(hd0,msdos3)
set sluice_cmdline="console=ttyS0 panic=1 loglevel=4"
EOF
    disk_put "$out" 1 "$work/p1"

    # p2: slot A holds the factory image; p3: slot B empty; p4: persistent data.
    disk_ext4 "$out" 2 "$SLOT_MB" -E root_owner=0:0 -d "$rootfs"
    disk_ext4 "$out" 4 "$PERSIST_MB" -E root_owner=0:0 -d "$persist" -L persistent
}

cmd=${1:-}
shift || true
case $cmd in
kernel) kernel ;;
rootfs) [ $# -eq 4 ] || die "usage: rootfs OUT VERSION BEHAVIOUR AGENT_BIN"; rootfs "$@" ;;
disk) [ $# -eq 3 ] || die "usage: disk OUT ROOTFS PERSIST"; disk "$@" ;;
*) die "usage: mkvm.sh kernel | rootfs OUT VERSION BEHAVIOUR AGENT_BIN | disk OUT ROOTFS PERSIST" ;;
esac
