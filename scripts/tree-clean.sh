#!/usr/bin/env bash
# Runs a command (the test suite), then fails if it left the git work tree different:
# `git status --porcelain` after must equal before (empty on a clean clone, as in CI).
# Tests write under temporary folders; a file that shows up here is a test writing into the
# repository.
set -uo pipefail
cd "$(dirname "$0")/.."
if ! git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  exec "$@"  # not a git checkout (an sdist): nothing to compare
fi
before="$(git status --porcelain --untracked-files=all)"
"$@"
rc=$?
after="$(git status --porcelain --untracked-files=all)"
if [ "$before" != "$after" ]; then
  echo "error: running the tests changed the work tree (tests must write under tmp_path):" >&2
  diff <(printf '%s\n' "$before") <(printf '%s\n' "$after") | grep '^[<>]' >&2
  [ "$rc" -ne 0 ] || rc=1
fi
exit "$rc"
