#!/usr/bin/env bash
# The whole test suite on a bare Debian/Ubuntu machine with only Rust: installs what the Studio's GUI tests need
# (they render with wgpu; without a GPU that is lavapipe, Mesa's software Vulkan), then runs `cargo test`.
# Arguments go to `cargo test` (e.g. `scripts/test.sh --release`, `scripts/test.sh -- masks`).
set -euo pipefail
cd "$(dirname "$0")/.."

need=(mesa-vulkan-drivers libvulkan1)
missing=()
if command -v dpkg >/dev/null; then
    for p in "${need[@]}"; do
        dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
    done
fi
if [ "${#missing[@]}" -gt 0 ]; then
    echo "== installing ${missing[*]} (software Vulkan for the GUI tests)"
    if [ "$(id -u)" = 0 ]; then
        sudo=()
    elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
        sudo=(sudo -n)
    else
        echo "the GUI tests need: ${missing[*]}; install them as root (apt-get install ${missing[*]}) and rerun" >&2
        exit 1
    fi
    "${sudo[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# wgpu and winit want a private runtime folder; a bare container has none.
if [ -z "${XDG_RUNTIME_DIR:-}" ] || [ ! -d "${XDG_RUNTIME_DIR}" ]; then
    XDG_RUNTIME_DIR="$(mktemp -d)"
    chmod 0700 "$XDG_RUNTIME_DIR"
    export XDG_RUNTIME_DIR
fi

echo "== cargo test $*"
exec cargo test --locked "$@"
