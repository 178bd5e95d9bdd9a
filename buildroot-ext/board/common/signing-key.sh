#!/usr/bin/env bash
# Prints the update signing key that BR2_PACKAGE_CLOUDLET_SIGNING_KEY names,
# as an absolute path, or nothing when the option is empty (then
# image/bundle.sh takes CLOUDLET_SIGNING_KEY from the environment, or makes
# a development key). For post-build.sh and post-image.sh.
#
# The option is an absolute path, or one relative to this external tree
# (BR2_EXTERNAL_CLOUDLET_PATH, the buildroot-ext directory), which it may
# also spell $(BR2_EXTERNAL_CLOUDLET_PATH).
set -euo pipefail
key="$(sed -n 's/^BR2_PACKAGE_CLOUDLET_SIGNING_KEY="\(.*\)"$/\1/p' "$BR2_CONFIG")"
[ -n "$key" ] || exit 0
key="${key//\$(BR2_EXTERNAL_CLOUDLET_PATH)/$BR2_EXTERNAL_CLOUDLET_PATH}"
case "$key" in
  /*) ;;
  *) key="$BR2_EXTERNAL_CLOUDLET_PATH/$key" ;;
esac
if [ ! -f "$key" ]; then
  echo "BR2_PACKAGE_CLOUDLET_SIGNING_KEY: no such file: $key" >&2
  exit 1
fi
echo "$key"
