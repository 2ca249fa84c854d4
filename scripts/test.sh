#!/usr/bin/env bash
# cloudckpt's one test command: CI (.ci/run) and README run exactly this.
# Extra arguments go to pytest, e.g.  bash scripts/test.sh -m "not seaweedfs" -x
# or  bash scripts/test.sh tests/unit . Without paths pytest runs testpaths (tests/), and the
# default selection (pyproject addopts) skips the slow and bench tiers.
set -euo pipefail
cd "$(dirname "$0")/.."

# gcsfs against an emulator takes ~1 min per call without this (see tests/conftest.py).
export GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false

status=0
python -m pytest -q -p no:cacheprovider "$@" || status=$?
if [ "$status" -eq 5 ]; then
    echo "scripts/test.sh: pytest collected no tests; treating that as a failure" >&2
    exit 1
fi
exit "$status"
