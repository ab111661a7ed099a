#!/usr/bin/env bash
# Install everything the tests need (venv, Python deps, Debian packages, Kafka jars) and run
# the whole suite against real servers started by the tests' own fixtures.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh --test || exit 1
echo "[test] ruff + mypy"
.venv/bin/ruff check . || exit 1
.venv/bin/mypy . || exit 1
echo "[test] pytest (FEDFLEET_REQUIRE_REAL=${FEDFLEET_REQUIRE_REAL:-0})"
.venv/bin/python -m pytest -ra "$@"
rc=$?
if [[ $rc -eq 5 ]]; then
  echo "[test] pytest collected no tests: failing" >&2
  exit 1
fi
exit $rc
