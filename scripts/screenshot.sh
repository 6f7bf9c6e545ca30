#!/usr/bin/env bash
# Builds the Studio, opens the real window under Xvfb (software Vulkan: lavapipe) and saves a screenshot to
# docs/img/studio.png (or $1).
#
# Needs: xvfb, xauth, imagemagick (`import`), mesa-vulkan-drivers, libvulkan1 (Debian package names).
# Environment: WAIT_SECS (default 40) — how long the window runs before the capture, so that the model thread
# has computed M_s over the timeline; PROFILE (default release).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-docs/img/studio.png}"
wait_secs="${WAIT_SECS:-40}"
profile="${PROFILE:-release}"

for tool in Xvfb import; do
    command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install xvfb imagemagick)" >&2; exit 1; }
done

if [ "$profile" = release ]; then
    cargo build --release --bin focusdpo
    bin="${CARGO_TARGET_DIR:-target}/release/focusdpo"
else
    cargo build --bin focusdpo
    bin="${CARGO_TARGET_DIR:-target}/debug/focusdpo"
fi

runtime="$(mktemp -d)"
chmod 0700 "$runtime"
export XDG_RUNTIME_DIR="$runtime"
# A fresh settings folder: the screenshot shows the defaults, not this machine's last session.
export XDG_DATA_HOME="$runtime/data" XDG_CONFIG_HOME="$runtime/config"
display=":$((90 + RANDOM % 9))"
Xvfb "$display" -screen 0 1400x900x24 -nolisten tcp >/dev/null 2>&1 &
xvfb_pid=$!
app_pid=""
cleanup() {
    [ -n "$app_pid" ] && kill "$app_pid" 2>/dev/null || true
    kill "$xvfb_pid" 2>/dev/null || true
    rm -rf "$runtime"
}
trap cleanup EXIT
sleep 2

# winit picks X11 when WAYLAND_DISPLAY is unset.
DISPLAY="$display" WAYLAND_DISPLAY= WGPU_BACKEND=vulkan "$bin" &
app_pid=$!
sleep "$wait_secs"
kill -0 "$app_pid" || { echo "the Studio exited early" >&2; exit 1; }
mkdir -p "$(dirname "$out")"
DISPLAY="$display" import -window root "$out"
echo "saved $out"
