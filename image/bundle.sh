#!/usr/bin/env bash
# Signed update bundles, for both image builders (scripts/build-image and
# Buildroot's post-build/post-image). Needs the host tool cloudlet-bundle
# in $CLOUDLET_BUNDLE_TOOL (or on PATH).
#
#   bundle.sh key KEYDIR [ROOTFS]
#       Picks the signing key: $CLOUDLET_SIGNING_KEY (a secret made by
#       `cloudlet-bundle keygen`, with its public key beside it as .pub), or a
#       development key in KEYDIR, made once. With ROOTFS, installs the public
#       key into ROOTFS/etc/cloudlet/update-keys/ (the box trusts it from then
#       on). Prints the secret key's path.
#   bundle.sh release ROOTFS BOARD
#       Writes ROOTFS/etc/cloudlet/release: the version bundles of this
#       build carry and the board, which the updater on the box compares
#       bundles against. $CLOUDLET_RELEASE_VERSION overrides the version.
#   bundle.sh make KEY BOARD KERNEL INITRD ROOTFS_IMAGE OUTDIR
#       Writes OUTDIR/cloudlet-BOARD-VERSION.cub, checks it against the
#       public key and prints its path.
set -euo pipefail
TOOL="${CLOUDLET_BUNDLE_TOOL:-cloudlet-bundle}"
HERE="$(cd "$(dirname "$0")" && pwd)"

version() {
  if [ -n "${CLOUDLET_RELEASE_VERSION:-}" ]; then echo "$CLOUDLET_RELEASE_VERSION"; return; fi
  local v sha
  v="$(sed -n 's/^version = "\(.*\)"/\1/p' "$HERE/../Cargo.toml" | head -1)"
  sha="$(git -C "$HERE/.." rev-parse --short HEAD 2>/dev/null || true)"
  echo "${v}${sha:++g$sha}"
}

case "${1:-}" in
  key)
    keydir="$2"; rootfs="${3:-}"
    if [ -n "${CLOUDLET_SIGNING_KEY:-}" ]; then
      key="$CLOUDLET_SIGNING_KEY"
      [ -f "$key" ] && [ -f "$key.pub" ] || { echo "bundle.sh: $key and $key.pub must exist" >&2; exit 1; }
    else
      key="$keydir/dev-update.key"
      if [ ! -f "$key" ]; then
        mkdir -p "$keydir"
        "$TOOL" keygen --secret "$key" --public "$key.pub" >&2
        echo "bundle.sh: made a DEVELOPMENT signing key $key; set CLOUDLET_SIGNING_KEY for releases" >&2
      fi
    fi
    if [ -n "$rootfs" ]; then
      install -D -m 0644 "$key.pub" "$rootfs/etc/cloudlet/update-keys/$(basename "$key").pub"
    fi
    echo "$key"
    ;;
  release)
    rootfs="$2"; board="$3"
    mkdir -p "$rootfs/etc/cloudlet"
    printf 'VERSION=%s\nBOARD=%s\n' "$(version)" "$board" > "$rootfs/etc/cloudlet/release"
    ;;
  make)
    key="$2"; board="$3"; kernel="$4"; initrd="$5"; rootfs="$6"; outdir="$7"
    out="$outdir/cloudlet-$board-$(version).cub"
    "$TOOL" create --key "$key" --board "$board" --version "$(version)" \
      --kernel "$kernel" --initrd "$initrd" --rootfs "$rootfs" --output "$out" >&2
    "$TOOL" verify --trusted "$key.pub" "$out" >&2
    echo "$out"
    ;;
  *) echo "usage: bundle.sh key KEYDIR [ROOTFS] | release ROOTFS BOARD | make KEY BOARD KERNEL INITRD ROOTFS_IMAGE OUTDIR" >&2; exit 2 ;;
esac
