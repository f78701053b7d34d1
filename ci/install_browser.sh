#!/bin/sh
# Install what tests/test_browser.py needs, quietly and only when missing (safe to run again):
# Debian's Chromium (Playwright's own browser download is not used) and the playwright Python package.
#
#     sh ci/install_browser.sh         # as root or with sudo, inside the project's virtualenv (or with PYTHON=...)
set -eu

PYTHON="${PYTHON:-python}"

if [ ! -x /usr/bin/chromium ]; then
    SUDO=""
    if [ "$(id -u)" != 0 ]; then
        if ! command -v sudo >/dev/null 2>&1; then
            echo "install_browser.sh: /usr/bin/chromium is missing and apt-get needs root (or sudo)" >&2
            exit 1
        fi
        SUDO="sudo"
    fi
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi

if ! "$PYTHON" -c "import playwright" 2>/dev/null; then
    # No `playwright install`: tests launch /usr/bin/chromium through executable_path.
    "$PYTHON" -m pip install -q --disable-pip-version-check playwright
fi
