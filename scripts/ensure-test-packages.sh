#!/usr/bin/env bash
# Install the Debian packages the tests need, when missing; idempotent, silent when all is there.
#
#   chromium        tests/tasks/test_quality_report.py opens the quality report in headless Chromium
#                   with the network blocked
#   docker-compose  tests/infra/test_compose.py renders infra/compose/compose.yaml (Debian's 1.29)
#   postgresql-15   tests/integration/test_production_stack.py runs Prefect and MLflow on it
#
# Needs root and apt. Without them it prints a warning and exits 0: the tests that need a
# missing package skip and say why.
set -uo pipefail

PACKAGES=(chromium docker-compose postgresql-15)

missing=()
for package in "${PACKAGES[@]}"; do
  # dpkg -s exits 0 for a removed package whose config files remain: check the status line too
  if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$package")
  fi
done
[ ${#missing[@]} -eq 0 ] && exit 0

warn() {
  echo "ensure-test-packages: WARNING: $1; tests that need ${missing[*]} will be skipped." \
       "Install it by hand: sudo apt-get install --no-install-recommends ${missing[*]}" >&2
  exit 0
}

command -v apt-get >/dev/null 2>&1 || warn "apt-get not found (not Debian/Ubuntu?), cannot install ${missing[*]}"
[ "$(id -u)" -eq 0 ] || warn "not root, cannot install ${missing[*]}"

echo "ensure-test-packages: installing ${missing[*]} (Debian packages the tests need)"
log=$(mktemp)
if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
         "${missing[@]}"; } >"$log" 2>&1; then
  tail -n 5 "$log" >&2
  rm -f "$log"
  warn "apt-get failed to install ${missing[*]} (output above)"
fi
rm -f "$log"
exit 0
