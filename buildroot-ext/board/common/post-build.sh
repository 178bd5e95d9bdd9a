#!/usr/bin/env bash
# Buildroot post-build: make the target tree what cloudlet-init expects.
# Arguments: TARGET_DIR, then BR2_ROOTFS_POST_SCRIPT_ARGS (the board name).
set -euo pipefail
TARGET="$1"

# cloudlet-init is PID 1; nothing of the skeleton's init system stays.
[ -x "$TARGET/sbin/init" ] || { echo "post-build: /sbin/init (cloudlet-init) is missing" >&2; exit 1; }
rm -rf "$TARGET/etc/init.d" "$TARGET/etc/inittab" "$TARGET/linuxrc"
# Mount points for the read-only root; /data holds everything mutable.
mkdir -p "$TARGET/data" "$TARGET/boot" "$TARGET/run" "$TARGET/tmp"
# udhcpc writes DNS servers to /run (the root is read-only).
ln -sfn /run/resolv.conf "$TARGET/etc/resolv.conf"
# The console shell's applet and udhcpc must be where the manifest says.
for f in bin/busybox sbin/udhcpc sbin/mke2fs sbin/e2fsck usr/bin/cloudletd usr/bin/cloudlet; do
  [ -e "$TARGET/$f" ] || { echo "post-build: /$f is missing" >&2; exit 1; }
done

# The key that signs this build's update bundle: its public half goes into
# the root filesystem, so the box trusts bundles signed with it.
key_opt="$("$(dirname "$0")/signing-key.sh")"
[ -z "$key_opt" ] || export CLOUDLET_SIGNING_KEY="$key_opt"
CLOUDLET_BUNDLE_TOOL="$HOST_DIR/bin/cloudlet-bundle" \
  "$BR2_EXTERNAL_CLOUDLET_PATH/../image/bundle.sh" key "$BASE_DIR/cloudlet-keys" "$TARGET" >/dev/null
# The release this image is (version and board), which the updater compares
# bundles against. The board name is the post-script argument.
"$BR2_EXTERNAL_CLOUDLET_PATH/../image/bundle.sh" release "$TARGET" "${2:?post-build: the board name is the post-script argument}"
