#!/usr/bin/env bash
# Assembles a Cloudlet disk image from built pieces: the boot script, the
# initial A/B boot state, the partition layout (genimage.cfg.in) and genimage.
# Shared by the offline builder (scripts/build-image) and Buildroot's
# post-image, so QEMU tests exercise the layout that ships.
#
#   assemble.sh IMAGE_NAME INPUT_DIR OUTPUT_DIR [BOOT_FILE ...]
#
# INPUT_DIR holds Image-A, initrd-A and rootfs.squashfs; BOOT_FILEs are extra
# files (paths relative to INPUT_DIR) for the FAT partition, e.g. the Pi firmware.
# Fails, saying by how much, if rootfs.squashfs does not fit the root slots.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
name="$1"; in="$2"; out="$3"; shift 3
for f in Image-A initrd-A rootfs.squashfs; do
  [ -e "$in/$f" ] || { echo "assemble.sh: $in/$f is missing" >&2; exit 1; }
done
work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT

# The root filesystem must fit both slots (an update writes it to the other
# one): check it against their sizes in the layout, with a message that says so.
slot_bytes() { # partition -> its size in bytes, from genimage.cfg.in
  awk -v p="$1" '
    $1 == "partition" && $2 == p { inside = 1; next }
    inside && $1 == "}" { exit }
    inside && $1 == "size" {
      if (!match($3, /^[0-9]+/)) { print "bad"; exit }
      unit = substr($3, RLENGTH + 1)
      if (unit == "") f = 1
      else if (unit == "k" || unit == "K") f = 1024
      else if (unit == "M") f = 1048576
      else if (unit == "G") f = 1073741824
      else { print "bad"; exit }
      printf "%.0f\n", substr($3, 1, RLENGTH) * f; exit
    }' "$here/genimage.cfg.in"
}
rootfs_bytes="$(stat -L -c %s "$in/rootfs.squashfs")"
for slot in rootfs-a rootfs-b; do
  size="$(slot_bytes "$slot")"
  case "$size" in
    ''|bad) echo "assemble.sh: no size in bytes, K, M or G for partition $slot in $here/genimage.cfg.in" >&2; exit 1 ;;
  esac
  if [ "$rootfs_bytes" -gt "$size" ]; then
    awk -v r="$rootfs_bytes" -v s="$size" -v p="$slot" -v f="$in/rootfs.squashfs" 'BEGIN {
      printf "assemble.sh: %s is %.1f MiB (%.0f bytes), more than the %.1f MiB (%.0f bytes) of its slot, partition %s in image/genimage.cfg.in: make the root filesystem smaller\n", f, r / 1048576, r, s / 1048576, s, p }' >&2
    exit 1
  fi
done

mkimage -A arm64 -T script -C none -n "Cloudlet boot" -d "$here/boot.cmd" "$in/boot.scr" >/dev/null
# Two copies of the boot state; copy 0 is the newer (its BOOT_SEQ is copy 1's plus one).
printf 'BOOT_A_LEFT=3\nBOOT_B_LEFT=0\nBOOT_ORDER=A B\nBOOT_SEQ=1\n' > "$work/state0.txt"
printf 'BOOT_A_LEFT=3\nBOOT_B_LEFT=0\nBOOT_ORDER=A B\nBOOT_SEQ=0\n' > "$work/state1.txt"
mkenvimage -s 0x1000 -p 0 -o "$in/bootstate0.env" "$work/state0.txt"
mkenvimage -s 0x1000 -p 0 -o "$in/bootstate1.env" "$work/state1.txt"

files=""
for f in "$@"; do files+="$(printf '\t\t\t"%s",' "$f")"$'\n'; done
awk -v files="$files" -v name="$name" '
  /#BOOT_FILES#/ { printf "%s", files; next }
  { gsub("#IMAGE_NAME#", name); print }' "$here/genimage.cfg.in" > "$work/genimage.cfg"
mkdir -p "$work/root" "$out"
genimage --config "$work/genimage.cfg" --rootpath "$work/root" --tmppath "$work/tmp" \
  --inputpath "$in" --outputpath "$out" > "$work/genimage.log" 2>&1 \
  || { cat "$work/genimage.log" >&2; exit 1; }
echo "$out/$name"
