#!/usr/bin/env bash
# Regenerates constraints.txt, the exact versions `scripts/env.sh` installs: run after changing a dependency, let
# CI pass with the new file, then commit it. A fresh machine next month then gets what was tested.
#
#   scripts/lock.sh
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
QJAX_VENV="$tmp/venv" QJAX_CONSTRAINTS=none "$repo/scripts/env.sh" true
{
  echo "# The versions CI last passed with; regenerate with scripts/lock.sh (see its header)."
  "$tmp/venv/bin/python" -m pip freeze --exclude-editable --all | grep -v -E '^(pip|wheel)=='
} > "$repo/constraints.txt"
echo "wrote $repo/constraints.txt"
