#!/usr/bin/env bash
# test.sh: every check of ciped, in one command. As root it includes the end-to-end
# tests (two ciped processes in network namespaces); as another user those are skipped
# with the reason (and with CI=true a skip is a failure). As root it first installs the
# Debian packages the tests use, if missing.
#   FUZZTIME=500000x ./test.sh   fuzz each target longer (default 50000 runs, 5-20 s each)
# The budget is a count of runs, not a duration: with a duration, Go 1.26's fuzzing
# coordinator can report "context deadline exceeded" as a failure when time runs out
# (golang/go#75804, fixed in Go 1.27); a count has no deadline to race.
set -euo pipefail
cd "$(dirname "$0")"
command -v go >/dev/null || PATH=$PATH:/usr/local/go/bin
fuzztime=${FUZZTIME:-50000x}

# The end-to-end tests drive real tools. As root on Debian, install the missing ones
# (NOINSTALL=1 to leave the system alone: tests whose tool is missing then skip, saying
# which package they need, and with CI=true such a skip is a failure).
packages=(iproute2 iputils-ping iperf3 nftables tcpdump ethtool python3 python3-cryptography
	systemd groff-base dante-server gcc binutils dpkg-dev lintian)
if [ "$(id -u)" = 0 ] && [ -z "${NOINSTALL:-}" ] && command -v apt-get >/dev/null; then
	missing=()
	for p in "${packages[@]}"; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
	done
	if [ ${#missing[@]} -gt 0 ]; then
		echo "== installing ${missing[*]}"
		apt-get update -qq
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
	fi
fi

echo "== gofmt"
unformatted=$(gofmt -l .)
if [ -n "$unformatted" ]; then
	echo "gofmt would change: $unformatted" >&2
	exit 1
fi

echo "== go vet"
go vet ./...

echo "== go test -race: unit, in-process and end-to-end tests"
go test -race -count=1 ./...

echo "== benchmarks, one round each (they must run; how fast is bench/run.sh's business)"
go test -run '^$' -bench . -benchtime 1x -count=1 . >/dev/null

echo "== fuzzing, $fuzztime per target"
for target in $(go test -list '^Fuzz' . | grep '^Fuzz'); do
	if out=$(go test -run '^$' -fuzz "^${target}\$" -fuzztime "$fuzztime" -fuzzminimizetime 2s . 2>&1); then
		echo "$target: $(echo "$out" | tail -1)"
	else
		echo "$out" >&2
		exit 1
	fi
done

echo "== all checks passed"
