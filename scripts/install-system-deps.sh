#!/usr/bin/env bash
# System packages the test suite needs beyond Python: a real OCI registry (Debian's
# docker-registry) for the distribution tests. Installs it when missing and we may
# (root, or passwordless sudo); otherwise says so, and those tests skip with that reason.
set -euo pipefail

if command -v docker-registry >/dev/null 2>&1 || command -v registry >/dev/null 2>&1; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "note: no apt-get here; install a docker registry (distribution) to run the registry tests" >&2
    exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
    if sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
        echo "note: not root; 'apt-get install docker-registry' to run the registry tests" >&2
        exit 0
    fi
fi
if ! { $SUDO apt-get update -qq && \
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq docker-registry >/dev/null; }; then
    echo "WARNING: could not install docker-registry; the registry tests will skip" >&2
    exit 0
fi
# The package enables a system service on its default port; the tests start their own.
$SUDO systemctl disable --now docker-registry >/dev/null 2>&1 || true
