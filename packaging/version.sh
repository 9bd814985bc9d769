#!/bin/sh
# version.sh: print the package's upstream version, from ../VERSION and git.
#   HEAD is tagged v$VERSION and the tree is clean   ->  0.4.0
#   any other commit                                  ->  0.4.0+git20261201.31.ac90f88
#       (+git sorts after the release VERSION names; the commit's UTC date and the count of
#        commits in its history make snapshots sort in history order)
#   uncommitted changes                               ->  ....ac90f88.dirty
# VERSION names the release this tree is, or was last released as: bump it when tagging.
set -eu
cd "$(dirname "$0")/.."
base=$(tr -d ' \t\r\n' < VERSION)
if ! printf '%s\n' "$base" | grep -Eq '^[0-9][A-Za-z0-9.+~]*$'; then
	echo "version.sh: VERSION must start with a digit and hold only A-Za-z0-9.+~ (not $base)" >&2
	exit 1
fi
if ! git rev-parse --git-dir >/dev/null 2>&1; then
	echo "$base" # an exported tree: VERSION alone
	exit 0
fi
dirty=
git diff --quiet HEAD -- 2>/dev/null || dirty=.dirty
if [ -z "$dirty" ] && [ -n "$(git tag --points-at HEAD -l "v$base")" ]; then
	echo "$base"
	exit 0
fi
date=$(TZ=UTC git log -1 --format=%cd --date=format-local:%Y%m%d)
echo "$base+git$date.$(git rev-list --count HEAD).$(git rev-parse --short=7 HEAD)$dirty"
