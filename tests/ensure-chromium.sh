#!/usr/bin/env bash
# The dashboard's browser tests drive Debian's chromium (they are never skipped): install it when
# it is missing, as root or through passwordless sudo; otherwise say what is needed and fail.
set -euo pipefail
command -v chromium >/dev/null && exit 0
as_root=()
[ "$(id -u)" -eq 0 ] || as_root=(sudo -n)
if command -v apt-get >/dev/null; then
    echo "installing Debian's chromium for the dashboard's browser tests" >&2
    "${as_root[@]}" apt-get update -q >&2
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends chromium fonts-liberation >&2
fi
command -v chromium >/dev/null || {
    echo "the dashboard tests need chromium: apt-get install chromium (Debian/Ubuntu)" >&2
    exit 1
}
