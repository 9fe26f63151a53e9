#!/usr/bin/env bash
# System packages the test suite needs beyond Python: a real OCI registry (Debian's
# docker-registry) for the distribution tests, and a headless browser (Debian's chromium) for
# the CORS tests that call the daemon from a real web page and the web page's own tests, and
# mkfs.xfs (xfsprogs) for the copy-on-write import test. Installs what is missing when we may
# (root, or passwordless sudo); otherwise says so, and those tests skip with that reason.
set -euo pipefail

missing=()
if ! command -v docker-registry >/dev/null 2>&1 && ! command -v registry >/dev/null 2>&1; then
    missing+=(docker-registry)
fi
if ! command -v chromium >/dev/null 2>&1; then
    missing+=(chromium)
fi
if ! command -v mkfs.xfs >/dev/null 2>&1; then
    missing+=(xfsprogs)  # a loop-mounted XFS with reflink: tests/test_import_clone.py
fi
if ! command -v npm >/dev/null 2>&1; then
    missing+=(nodejs npm)  # the coding agents of tests/test_agents.py come from npm
fi
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "note: no apt-get here; install ${missing[*]} to run the registry and browser tests" >&2
    exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
    if sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
        echo "note: not root; 'apt-get install ${missing[*]}' to run the registry and browser tests" >&2
        exit 0
    fi
fi
if ! { $SUDO apt-get update -qq && \
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null; }; then
    echo "WARNING: could not install ${missing[*]}; the tests that need them will skip" >&2
    exit 0
fi
# docker-registry enables a system service on its default port; the tests start their own.
$SUDO systemctl disable --now docker-registry >/dev/null 2>&1 || true
