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
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
name="$1"; in="$2"; out="$3"; shift 3
for f in Image-A initrd-A rootfs.squashfs; do
  [ -e "$in/$f" ] || { echo "assemble.sh: $in/$f is missing" >&2; exit 1; }
done
work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT

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
