#!/usr/bin/env bash
# Create or update ./.venv, idempotently; seconds when nothing changed.
#
# The heavy part (torch, ray, ...; ~6 GB) lives OUTSIDE the clone in a cache keyed by a
# hash of requirements.lock + the Python version, so a fresh clone with an unchanged lock
# reuses it. ./.venv is a thin venv that sees that cache through a .pth file and holds
# only radground itself (editable), so two clones never fight over one install.
set -euo pipefail

# This machine's pip config names local wheel folders that pip reports as missing for
# every package; those warnings are noise, real errors still pass through.
quiet_pip() { { "$@"; } 2>&1 | { grep -v "is neither a file nor a directory" || true; }; }

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3.11}
LOCK="$ROOT/requirements.lock"
VENV="$ROOT/.venv"

if ! command -v "$PYTHON" >/dev/null 2>&1; then
  echo "ensure-venv: $PYTHON not found. Install Python 3.11 or set PYTHON=/path/to/python3.11." >&2
  exit 1
fi
PYVER=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [ "$PYVER" != "3.11" ]; then
  echo "ensure-venv: $PYTHON is Python $PYVER; radground pins wheels for 3.11. Set PYTHON=python3.11." >&2
  exit 1
fi

KEY=$( (cat "$LOCK"; "$PYTHON" -VV; uname -m) | sha256sum | cut -c1-16)
CACHE=${RADGROUND_VENV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/radground/venvs}
DEPS="$CACHE/deps-$KEY"
mkdir -p "$CACHE"

# One builder at a time per cache (two `make` runs in parallel must not race).
exec 9>"$CACHE/.lock-$KEY"
flock 9
if [ ! -f "$DEPS/.complete" ]; then
  echo "ensure-venv: installing pinned dependencies into $DEPS (first time for this lock: minutes)" >&2
  rm -rf "$DEPS"
  "$PYTHON" -m venv "$DEPS"
  quiet_pip "$DEPS/bin/python" -m pip install --quiet --upgrade "pip==25.3"
  # The lock is complete (pip freeze --all), so no resolver run is needed.
  quiet_pip "$DEPS/bin/python" -m pip install --quiet --no-deps -r "$LOCK"
  # TotalSegmentator is in the lock for its label tables only (tests/test_labels.py regenerates the committed
  # label map from them); its nnU-Net runtime (nnunetv2, vtk, python-gdcm, ...) is installed by a site that
  # runs that backend, and would change pydicom's decoders here. Its missing requirements are the only ones
  # pip check may report.
  PROBLEMS=$("$DEPS/bin/python" -m pip check 2>&1 | grep -iv "^totalsegmentator 2.18.0 requires .*, which is not installed" \
             | grep -v "^No broken requirements found" || true)
  if [ -n "$PROBLEMS" ]; then echo "$PROBLEMS" >&2; exit 1; fi
  touch "$DEPS/.complete"
  # Keep the two newest dependency sets (this one and the previous lock's); drop older ones.
  ls -1dt "$CACHE"/deps-*/ 2>/dev/null | tail -n +3 | xargs -r rm -rf
fi
flock -u 9

STAMP=$( (echo "$DEPS"; cat "$ROOT/pyproject.toml") | sha256sum | cut -c1-16)
# One builder of this clone's .venv at a time, too (two `make` targets started together).
exec 8>"$ROOT/.venv.lock"
flock 8
if [ ! -f "$VENV/.radground-stamp" ] || [ "$(cat "$VENV/.radground-stamp")" != "$STAMP" ]; then
  rm -rf "$VENV"
  "$PYTHON" -m venv --without-pip "$VENV"
  SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  DEPS_SITE=$("$DEPS/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  # addsitedir (not a bare path) so the cache's own .pth files are processed too.
  echo "import site; site.addsitedir('$DEPS_SITE')" > "$SITE/_radground_deps.pth"
  quiet_pip "$VENV/bin/python" -m pip install --quiet --no-deps --no-build-isolation -e "$ROOT"
  # Expose the cache's command-line tools (dvc, prefect, mlflow, ray, ruff, ...) in .venv/bin.
  for tool in "$DEPS"/bin/*; do
    name=$(basename "$tool")
    case "$name" in python*|pip*|activate*|Activate*|__pycache__) continue ;; esac
    [ -e "$VENV/bin/$name" ] || ln -sf "$tool" "$VENV/bin/$name"
  done
  echo "$STAMP" > "$VENV/.radground-stamp"
  echo "ensure-venv: .venv ready (dependencies from $DEPS)" >&2
fi
