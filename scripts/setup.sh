#!/usr/bin/env bash
# Installs the system packages the workspace links against, when missing.
# hwlocality links hwloc through pkg-config, and a static hwloc needs -ludev.
set -euo pipefail
missing=()
command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
if command -v pkg-config >/dev/null 2>&1; then
    pkg-config --exists hwloc 2>/dev/null || missing+=(libhwloc-dev)
    pkg-config --exists libudev 2>/dev/null || missing+=(libudev-dev)
else
    missing+=(libhwloc-dev libudev-dev)
fi
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}" >&2
    sudo_cmd=""
    [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
    $sudo_cmd apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${missing[@]}"
fi
command -v cargo >/dev/null 2>&1 || { echo "setup: cargo not found; install Rust (rustup) first" >&2; exit 1; }
