#!/usr/bin/env bash
# System packages the test suite and the network history stores need: redis-server, the PostgreSQL server, and
# Debian's chromium (the web chat page's browser tests drive it through Playwright; no browser is downloaded).
# Idempotent: does nothing when the binaries are present; otherwise apt-get update + install (Debian/Ubuntu).
set -euo pipefail

have_postgres() {
    command -v postgres >/dev/null 2>&1 && command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1 && return 0
    compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null && compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null
}

packages=()
command -v redis-server >/dev/null 2>&1 || packages+=(redis-server)
have_postgres || packages+=(postgresql-15)
command -v chromium >/dev/null 2>&1 || packages+=(chromium)
if [ ${#packages[@]} -eq 0 ]; then
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-system-deps: missing ${packages[*]} and no apt-get here: install them with your package manager" >&2
    exit 1
fi
sudo=()
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "install-system-deps: run as root (or install sudo) to install ${packages[*]}" >&2; exit 1; }
    sudo=(sudo)
fi
echo "install-system-deps: installing ${packages[*]}"
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
if [[ " ${packages[*]} " == *" postgresql-15 "* ]] && ! apt-cache show postgresql-15 >/dev/null 2>&1; then
    packages=("${packages[@]/postgresql-15/postgresql}")  # another release: its default PostgreSQL server
fi
# The packages' own services are not needed (the tests start private servers), so a failure to start them is fine.
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${packages[@]}"
