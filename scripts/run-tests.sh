#!/usr/bin/env bash
# `make test`: the whole suite on 2 cores. Most of its time is servers and runtimes starting (Prefect,
# Ray, MLflow, PostgreSQL), so it runs on two pytest-xdist workers, whole files per worker (a module's
# fixtures are built once), and beside them a third process for the training flow tests: a process keeps
# the first Ray auth token it read, and the rebuild flow tests read other data_dirs' tokens first (in one
# process the training flow's local Ray is then refused by its own GCS). Extra arguments go to both runs.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
TRAIN=tests/flows/test_train.py
LOG=build/train-tests.log
mkdir -p build
"$PYTHON" -m pytest "$TRAIN" "$@" > "$LOG" 2>&1 &
train=$!
trap 'kill "$train" 2>/dev/null' INT TERM
"$PYTHON" -m pytest -n 2 --dist loadfile --ignore="$TRAIN" "$@"
main=$?
wait "$train"
trained=$?
echo "---------- $TRAIN (ran beside the rest, in a process of its own; log: $LOG) ----------"
cat "$LOG"
exit $(( main != 0 || trained != 0 ))
