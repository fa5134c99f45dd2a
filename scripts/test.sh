#!/usr/bin/env bash
# The project's tests with their set-up: on a fresh Debian machine this is the one command to run.
#
#   scripts/test.sh                   every test (what CI runs)
#   scripts/test.sh -m "not slow"     any pytest arguments pass through
#
# 1. Programs the tests drive: redis-server (each Redis test starts and stops its own server on a
#    free port, so nothing needs to listen on 6379) and Debian chromium (the browser test, through
#    Playwright; never `playwright install`), from Debian's packages when missing (python3-venv too,
#    when a venv is to be made and Debian's python3 cannot).
# 2. Python: the active virtual environment, else ./.venv (created when missing: CPU-pinned torch and
#    the package); the test extra is installed into it when any of its requirements is missing.
# 3. python -m pytest. A test whose program is still missing fails with one line naming the package.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_PIN="torch==2.13.0"
DEBIAN_PACKAGES=(redis-server chromium python3-venv)

log() { echo "scripts/test.sh: $*" >&2; }

# The interpreter of the active venv, else of ./.venv, which is created when missing.
select_python() {
  if [ -n "${VIRTUAL_ENV:-}" ]; then
    PYTHON="$VIRTUAL_ENV/bin/python"
    return
  fi
  if [ ! -x .venv/bin/python ]; then
    log "creating .venv with $TORCH_PIN and the package"
    python3 -m venv .venv
    .venv/bin/python -m pip install -q "$TORCH_PIN" -e .
  fi
  PYTHON=.venv/bin/python
}

# True when every requirement of the test extra is installed at a version it accepts.
test_extra_installed() {
  "$PYTHON" - <<'PY'
import importlib.metadata as md
import sys

from packaging.requirements import Requirement

wanted = [Requirement(r) for r in md.requires("dreamr-stream") or []]
missing = []
for req in wanted:
    if req.marker is None or not req.marker.evaluate({"extra": "test"}):
        continue
    try:
        if not req.specifier.contains(md.version(req.name), prereleases=True):
            missing.append(str(req))
    except md.PackageNotFoundError:
        missing.append(str(req))
sys.exit(1 if missing else 0)
PY
}

install_test_extra() {
  if ! "$PYTHON" -c "import dreamr_stream, torch" 2>/dev/null; then
    log "installing $TORCH_PIN and the package"
    "$PYTHON" -m pip install -q "$TORCH_PIN" -e .
  fi
  if ! test_extra_installed; then
    log "installing the test extra"
    "$PYTHON" -m pip install -q -e ".[test]"
  fi
}

missing_packages() {
  command -v redis-server >/dev/null || echo redis-server
  [ -x /usr/bin/chromium ] || echo chromium
  # Debian's python3 makes venvs only with python3-venv (ensurepip); needed when .venv is to be made
  if [ -z "${VIRTUAL_ENV:-}" ] && [ ! -x .venv/bin/python ] && ! python3 -c "import ensurepip" 2>/dev/null; then
    echo python3-venv
  fi
}

# Debian's packages for what is missing; where they cannot be installed the tests say what to install.
install_debian_packages() {
  local missing
  missing=$(missing_packages | paste -sd " " -)
  [ -n "${missing// /}" ] || return 0
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo >/dev/null; then
      log "missing $missing; not root and no sudo: the tests that need them will fail"
      return 0
    fi
    sudo="sudo"
  fi
  if ! command -v apt-get >/dev/null; then
    log "missing $missing; no apt-get here: install ${DEBIAN_PACKAGES[*]} (or their equivalents) by hand"
    return 0
  fi
  log "installing $missing from Debian's packages"
  # $sudo and $missing are word-split on purpose
  $sudo apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq $missing >/dev/null
}

install_debian_packages
select_python
install_test_extra
exec "$PYTHON" -m pytest "$@"
