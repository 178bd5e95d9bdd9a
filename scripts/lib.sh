# Shared settings for Cloudlet's scripts. Source it; do not run it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${CLOUDLET_CACHE:-$HOME/.cache/cloudlet}"
OUT="${CLOUDLET_OUT:-$ROOT/out}"
TARGET=aarch64-unknown-linux-gnu
mkdir -p "$CACHE" "$OUT"

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
