#!/usr/bin/env bash
# Render an excise report.html to a PNG with headless Chromium (no network, no profile kept).
#
#   scripts/render_report.sh RUN/report/report.html docs/img/demo_report.png [WIDTH] [HEIGHT]
#
# Needs Debian's `chromium` package (`apt-get install -y chromium`). The report is
# self-contained (inline CSS, plots as base64 PNG), so Chromium is kept off the network:
# background networking, component updates and sync are disabled, and the profile lives in
# a temporary folder removed on exit.
set -euo pipefail

if [[ $# -lt 2 ]]; then
  echo "usage: $0 REPORT.html OUT.png [WIDTH=1280] [HEIGHT=2400]" >&2
  exit 2
fi
html=$(realpath "$1")
out=$(realpath -m "$2")
width=${3:-1280}
height=${4:-2400}
[[ -f "$html" ]] || { echo "error: $1 does not exist" >&2; exit 2; }
browser=$(command -v chromium || command -v chromium-browser || true)
[[ -n "$browser" ]] || { echo "error: chromium not found; install it with: apt-get install -y chromium" >&2; exit 2; }

profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
mkdir -p "$(dirname "$out")"
"$browser" --headless --no-sandbox --disable-gpu --disable-background-networking \
  --disable-component-update --disable-sync --no-first-run --hide-scrollbars \
  --user-data-dir="$profile" --window-size="$width,$height" \
  --screenshot="$out.tmp.png" "file://$html" >/dev/null 2>&1
mv "$out.tmp.png" "$out"
echo "wrote $out"
