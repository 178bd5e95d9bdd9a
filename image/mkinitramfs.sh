#!/usr/bin/env bash
# Builds the stage-1 initramfs: cloudlet-init as /init, the board's module
# list, and those modules with their dependencies. Shared by the offline
# builder (scripts/build-image) and Buildroot's post-image.
#
#   mkinitramfs.sh INIT_BINARY MODULE_LIST MODULES_DIR OUT_CPIO
#
# MODULES_DIR is /lib/modules/<release> of the kernel (with modules.dep), or
# "-" when the board's kernel has everything it needs built in.
set -euo pipefail
init="$1"; list="$2"; moddir="$3"; out="$4"
work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT
mkdir -p "$work"/{dev,proc,sys,newroot,etc/cloudlet}
install -m 0755 "$init" "$work/init"
: > "$work/etc/cloudlet/initramfs"
grep -v '^#' "$list" | sed '/^$/d' > "$work/etc/cloudlet/modules" || true
if [ "$moddir" != "-" ] && [ -s "$work/etc/cloudlet/modules" ]; then
  release="$(basename "$moddir")"
  dest="$work/lib/modules/$release"
  mkdir -p "$dest"
  : > "$work/modfiles"
  while read -r m; do
    pat="/${m//_/[-_]}\\.ko(\\.[a-z]+)?:"
    line="$(grep -E "$pat" "$moddir/modules.dep" || true)"
    if [ -z "$line" ]; then
      grep -qE "/${m//_/[-_]}\\.ko" "$moddir/modules.builtin" \
        || { echo "module $m is neither in modules.dep nor built in" >&2; exit 1; }
      continue
    fi
    echo "$line" | tr -d ':' | tr ' ' '\n' | sed '/^$/d' >> "$work/modfiles"
  done < "$work/etc/cloudlet/modules"
  sort -u "$work/modfiles" -o "$work/modfiles"
  while read -r f; do
    mkdir -p "$dest/$(dirname "$f")"
    cp "$moddir/$f" "$dest/$f"
  done < "$work/modfiles"
  # modules.dep trimmed to the shipped modules.
  awk 'NR==FNR { keep[$0]=1; next } { m=$1; sub(":$","",m); if (m in keep) print }' \
    "$work/modfiles" "$moddir/modules.dep" > "$dest/modules.dep"
  cp "$moddir/modules.builtin" "$dest/"
  rm "$work/modfiles"
fi
(cd "$work" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet -R 0:0) > "$out"
