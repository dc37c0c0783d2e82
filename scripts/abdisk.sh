# shellcheck shell=bash
# Sourced by os/mkos.sh and tests/vm/mkvm.sh: the steps both take to
# assemble a raw A/B disk from files with dd (no loop devices, no mounts):
# the partition layout, GRUB's files for the shipped agent/grub/sluice.cfg,
# and file systems written into their partitions.
# Needs: parted, grub-common, dosfstools, mtools, e2fsprogs.

ABDISK_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# The GRUB modules the shipped snippet and the configuration below use, on
# top of each disk's partition table and firmware modules.
# shellcheck disable=SC2034 # used by the scripts that source this one
GRUB_MODULES="fat ext2 normal configfile loadenv test echo linux boot serial terminal sleep halt cat"

# disk_layout OUT MB...: a fresh sparse OUT with partitions of MB MiB each,
# the first from 1 MiB on, and 1 MiB to spare at the end. Sets PART: PART[i]
# is partition i's first sector, PART[n+1] the sector after the last.
disk_layout() {
    local out=$1 mb i=1
    shift
    PART=([1]=2048)
    for mb in "$@"; do
        PART[i + 1]=$((PART[i] + mb * 2048))
        i=$((i + 1))
    done
    rm -f "$out"
    truncate -s $(((PART[i] + 2048) * 512)) "$out"
}

# disk_partition OUT TABLE SPEC...: parted's TABLE (msdos, gpt) on OUT with
# partition i from PART[i] to PART[i+1]; SPEC i is what parted's mkpart takes
# before the sectors ("primary ext4", "sluice-a ext4", "bios-boot").
disk_partition() {
    local out=$1 table=$2 spec i=1 args=()
    shift 2
    for spec in "$@"; do
        # shellcheck disable=SC2206 # a spec is words
        args+=(mkpart $spec "${PART[i]}s" "$((PART[i + 1] - 1))s")
        i=$((i + 1))
    done
    parted -s "$out" mklabel "$table" "${args[@]}"
}

# disk_grub_fat FAT LABEL MB < SETTINGS: a FAT16 image FAT of MB MiB named
# LABEL with /grub/grub.cfg (the serial console, no menu, the SETTINGS lines
# the snippet reads, the snippet, and a line naming the slot it boots), the
# snippet and a grubenv in which slot A is good and slot B empty.
disk_grub_fat() {
    local fat=$1 label=$2 mb=$3 dir
    dir=$(mktemp -d)
    {
        cat <<'EOF'
serial --unit=0 --speed=115200
terminal_input serial
terminal_output serial
set timeout=0
set default=0
EOF
        cat
        cat <<'EOF'
source $prefix/sluice.cfg
echo "GRUB-SLUICE: booting slot $sluice_slot ($grub_platform)"
EOF
    } >"$dir/grub.cfg"
    grub-editenv "$dir/grubenv" create
    grub-editenv "$dir/grubenv" set ORDER="A B" A_OK=1 A_TRY=0 B_OK=0 B_TRY=0
    rm -f "$fat"
    mkfs.vfat -F 16 -n "$label" -C "$fat" $((mb * 1024)) >/dev/null
    mmd -i "$fat" ::/grub
    mcopy -i "$fat" "$dir/grub.cfg" "$ABDISK_REPO/agent/grub/sluice.cfg" "$dir/grubenv" ::/grub/
    rm -rf "$dir"
}

# disk_put OUT N FILE: FILE's bytes into partition N of OUT, holes kept.
disk_put() {
    dd if="$3" of="$1" bs=1M seek=$((PART[$2] * 512)) oflag=seek_bytes conv=notrunc,sparse status=none
}

# disk_ext4 OUT N MB [MKFS_ARGS...]: an ext4 file system of MB MiB made with
# mkfs.ext4's MKFS_ARGS (-d FOLDER, -L LABEL, ...) into partition N of OUT.
disk_ext4() {
    local out=$1 n=$2 mb=$3
    shift 3
    mkfs.ext4 -q -F "$@" "$out.p$n" "${mb}M" >/dev/null
    disk_put "$out" "$n" "$out.p$n"
    rm -f "$out.p$n"
}
