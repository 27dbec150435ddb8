#!/usr/bin/env bash
# Install everything the tests need, from scratch, and run them.
#   Debian packages: curl and dig (dnsutils) drive the nodes as an operator
#   would; iproute2 (ip) makes the hosts of tests/test_multihost.py (network
#   namespaces, as root; elsewhere that test is skipped); prometheus checks the
#   metrics exposition (promtool) and evaluates the dashboard's and the
#   alerts' queries (a real server); chromium loads the DNS scheduler's status
#   page headless.
#   Python: a virtualenv in .venv with the package and its test extras;
#   ruff (pyflakes rules) first, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v dig >/dev/null 2>&1 || missing+=(dnsutils)
command -v ip >/dev/null 2>&1 || [ -x /usr/sbin/ip ] || missing+=(iproute2)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
if ((${#missing[@]})); then
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    # policy-rc.d 101: install the packages without starting their services
    # (the prometheus package would otherwise start a server).
    created_policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' | $sudo tee /usr/sbin/policy-rc.d >/dev/null
        $sudo chmod +x /usr/sbin/policy-rc.d
        created_policy=1
    fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
    [ -z "$created_policy" ] || $sudo rm -f /usr/sbin/policy-rc.d
fi

python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[test]'
.venv/bin/ruff check edge origin tests benchmarks
exec .venv/bin/python -m pytest -q "$@"
