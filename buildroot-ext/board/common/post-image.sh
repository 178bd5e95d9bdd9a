#!/usr/bin/env bash
# Buildroot post-image: the same disk layout as the offline QEMU builder,
# through the same scripts (image/mkinitramfs.sh and image/assemble.sh).
# Arguments: BINARIES_DIR, then the board name (BR2_ROOTFS_POST_SCRIPT_ARGS).
set -euo pipefail
BIN="$1"
BOARD="$2"
IMAGE_DIR="$BR2_EXTERNAL_CLOUDLET_PATH/../image"
export PATH="$HOST_DIR/bin:$HOST_DIR/sbin:$PATH"

moddir="-"
for d in "$TARGET_DIR"/lib/modules/*; do [ -f "$d/modules.dep" ] && moddir="$d"; done
"$IMAGE_DIR/mkinitramfs.sh" "$TARGET_DIR/sbin/init" "$IMAGE_DIR/boards/$BOARD/modules" "$moddir" "$BIN/initrd-A"
cp "$BIN/Image" "$BIN/Image-A"

extra=()
case "$BOARD" in
  rpi4)
    # The Pi firmware, its DTBs and overlays, config.txt, and U-Boot that it starts.
    for f in "$BIN"/*.dtb "$BIN"/rpi-firmware/*; do extra+=("${f#"$BIN"/}"); done
    extra+=(u-boot.bin)
    ;;
  qemu-aarch64) ;;
  *) echo "post-image: unknown board $BOARD" >&2; exit 1 ;;
esac

img="$("$IMAGE_DIR/assemble.sh" "cloudlet-$BOARD.img" "$BIN" "$BIN" "${extra[@]}")"
# A block map lets bmaptool write only the used blocks of the card.
if command -v bmaptool >/dev/null; then
  bmaptool create -o "$img.bmap" "$img"
fi
echo "Cloudlet image: $img"

# The signed update bundle of this build (kernel, initramfs, root filesystem).
key_opt="$("$(dirname "$0")/signing-key.sh")"
[ -z "$key_opt" ] || export CLOUDLET_SIGNING_KEY="$key_opt"
export CLOUDLET_BUNDLE_TOOL="$HOST_DIR/bin/cloudlet-bundle"
key="$("$IMAGE_DIR/bundle.sh" key "$BASE_DIR/cloudlet-keys")"
bundle="$("$IMAGE_DIR/bundle.sh" make "$key" "$BOARD" "$BIN/Image-A" "$BIN/initrd-A" \
  "$BIN/rootfs.squashfs" "$BIN")"
echo "Cloudlet update bundle: $bundle"
