#!/usr/bin/env bash
# bench/run.sh: measure ciped against other userspace tunnels on this machine.
#
#     sudo ./bench/run.sh                          # every system, RUNS=3 rounds of DURATION=10 s tests
#     sudo QUICK=1 ./bench/run.sh                  # RUNS=1, DURATION=3: a quick look
#     sudo SYSTEMS="ciped-aes wireguard-go" ./bench/run.sh
#
# What it measures. For each system, with an iperf3 server in namespace B (bound to the
# tunnel address 10.99.0.2, or to 198.18.0.2 for "veth") and the client in namespace A:
#   * ping RTT:     `ping -c 50 -i 0.02` through the idle tunnel, average RTT in ms
#   * TCP 1 stream: iperf3 -t DURATION, receiver throughput in Gbit/s (from iperf3 -J)
#   * TCP 4 streams: the same with -P 4, sum of the receivers
#   * tunnel CPU per GB: utime+stime (/proc/PID/stat fields 14, 15) of BOTH tunnel processes,
#     read right before and after the 1-stream run, divided by the GB (1e9 bytes) received
#   * peak RSS: VmHWM (/proc/PID/status) of each tunnel process after its runs; the larger
# Each cell of the table is "median (min–max)" over RUNS rounds; every round starts every
# system afresh (new namespaces, new processes), and the order rotates from round to round
# (round 1: a b c ..., round 2: b c ... a, ...). A second table gives the ciped rows'
# medians as ratios of wireguard-go's. The report (date, kernel, CPU, nproc, Go version,
# ciped commit, command line, tables, raw values) goes to stdout and to
# bench/results/<date>.md (gitignored).
#
# Systems (SYSTEMS="..." picks a subset, in this order of names):
#   veth             no tunnel: iperf3 straight over the veth pair (the ceiling)
#   ciped-aes        ciped, cipher=aes-gcm on both ends (one shared key, options files 0600)
#   ciped-chacha     ciped, cipher=chacha20-poly1305
#   ciped-nokey      ciped, nokey (plain IP in UDP, no key file)
#   wireguard-go     wireguard-go (built from the golang.zx2c4.com/wireguard version in
#                    go.mod), one per namespace, run in the foreground, configured with wg
#   openvpn-static   OpenVPN 2.6 point-to-point, static key, AES-256-CBC + HMAC-SHA256
#   openvpn-tls      OpenVPN 2.6 point-to-point, TLS (throwaway CA made with openssl),
#                    AES-256-GCM data channel
# All tunnels run in userspace (OpenVPN with --disable-dco), with each program's default MTU.
#
# Environment: RUNS (3), DURATION (seconds per TCP test, 10), SYSTEMS (all), QUICK=1
# (RUNS=1, DURATION=3 unless they are set too), UP_TIMEOUT (seconds a tunnel gets to pass
# a ping, 30), PINGS (50).
#
# What it installs: missing tools from Debian's packages (apt-get update first, then
# apt-get install --no-install-recommends): iproute2, iputils-ping, iperf3, jq, procps,
# and for the systems that need them wireguard-tools (wg), openvpn, openssl. It builds
# ciped and wireguard-go with Go (PATH, else /usr/local/go/bin) into a temporary
# directory; go.mod and go.sum are never written (a build that needs more go.sum entries
# uses a temporary copy of them via -modfile).
#
# Network safety: everything runs in two network namespaces made for this run
# (cbench<PID>a, cbench<PID>b) joined by a veth pair created inside them: carrier
# 198.18.0.1/24 and 198.18.0.2/24 (a benchmarking range), tunnel 10.99.0.1 and 10.99.0.2.
# Nothing is added to the host's own network namespace, so no packet can leave. On exit
# (normal, failure, Ctrl-C) the processes it started are stopped by their PIDs, the
# namespaces and temporary files are removed. A system that fails in a round (tunnel never
# passes a ping, iperf3 error) is reported with its logs, counted in the table, and makes
# the exit status 1; the other systems still run.
set -uo pipefail

ALL_SYSTEMS="veth ciped-aes ciped-chacha ciped-nokey wireguard-go openvpn-static openvpn-tls"

# The command line as given, with the settings that came from the environment.
cmdline=""
for v in QUICK RUNS DURATION SYSTEMS UP_TIMEOUT PINGS; do
	[ -n "${!v+x}" ] && cmdline+="$v=$(printf '%q' "${!v}") "
done
cmdline+=$(printf '%q' "$0")
for a in "$@"; do cmdline+=" $(printf '%q' "$a")"; done

if [ "${QUICK:-0}" = 1 ]; then
	RUNS=${RUNS:-1}
	DURATION=${DURATION:-3}
fi
RUNS=${RUNS:-3}
DURATION=${DURATION:-10}
SYSTEMS=${SYSTEMS:-$ALL_SYSTEMS}
UP_TIMEOUT=${UP_TIMEOUT:-30}
PINGS=${PINGS:-50}

die() { echo "bench: $*" >&2; exit 1; }
log() { echo "bench: $*" >&2; }

[ $# -eq 0 ] || die "no arguments expected (settings go in the environment; see the header of $0)"
for v in RUNS DURATION UP_TIMEOUT PINGS; do
	[[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive whole number, not '${!v}'"
done
read -r -a systems <<<"$SYSTEMS"
[ ${#systems[@]} -gt 0 ] || die "SYSTEMS is empty"
for s in "${systems[@]}"; do
	[[ " $ALL_SYSTEMS " == *" $s "* ]] || die "unknown system '$s' (known: $ALL_SYSTEMS)"
done
has() { [[ " ${systems[*]} " == *" $1"* ]]; }

[ "$(id -u)" = 0 ] || die "run as root (sudo ./bench/run.sh)"
[ -e /dev/net/tun ] || die "/dev/net/tun is missing"
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo" || die "cannot cd to $repo"

# --- tools -------------------------------------------------------------------------------

need=()
command -v ip >/dev/null || need+=(iproute2)
command -v ping >/dev/null || need+=(iputils-ping)
command -v iperf3 >/dev/null || need+=(iperf3)
command -v jq >/dev/null || need+=(jq)
command -v ps >/dev/null || need+=(procps)
if has wireguard-go; then command -v wg >/dev/null || need+=(wireguard-tools); fi
if has openvpn; then
	command -v openvpn >/dev/null || need+=(openvpn)
	command -v openssl >/dev/null || need+=(openssl)
fi
if [ ${#need[@]} -gt 0 ]; then
	log "installing ${need[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq >/dev/null || die "apt-get update failed"
	apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null || die "apt-get install ${need[*]} failed"
fi
command -v go >/dev/null || PATH=$PATH:/usr/local/go/bin
command -v go >/dev/null || die "Go is needed to build ciped and wireguard-go"

# --- state and cleanup -------------------------------------------------------------------

work=$(mktemp -d /tmp/ciped-bench.XXXXXX) || die "mktemp failed"
nsA=cbench$$a
nsB=cbench$$b
wgA=wgA$$
wgB=wgB$$
pids=()          # every background process started, stopped by PID on exit
etc_netns=no     # whether we made /etc/netns/<ns>/cipe (only if /etc/cipe exists)

ours() { # ours PID: whether PID is a living child of this script (not a reused PID)
	local st
	st=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
	st=${st##*) }
	set -- $st
	[ "$1" != Z ] && [ "$2" = $$ ]
}
stop_pid() { # stop_pid PID: SIGTERM, up to 5 s, then SIGKILL; reap it
	local pid=$1 i
	ours "$pid" || { wait "$pid" 2>/dev/null; return 0; }
	kill -TERM "$pid" 2>/dev/null
	for i in $(seq 50); do
		ours "$pid" || break
		sleep 0.1
	done
	ours "$pid" && { log "PID $pid ignored SIGTERM; killing it"; kill -KILL "$pid" 2>/dev/null; }
	wait "$pid" 2>/dev/null
	return 0
}
fgpid=""        # the long-running command run_fg is waiting for
run_fg() { # run_fg OUT CMD...: run CMD (output to OUT) in the background and wait for it,
	# so that a signal's trap runs at once (and its messages do not go to OUT)
	local out=$1
	shift
	"$@" >"$out" 2>&1 &
	fgpid=$!
	wait "$fgpid"
	local rc=$?
	fgpid=""
	return $rc
}
stop_all() {
	local pid
	for pid in "${pids[@]}"; do stop_pid "$pid"; done
	pids=()
}
del_netns() {
	ip netns del "$nsA" 2>/dev/null
	ip netns del "$nsB" 2>/dev/null
	rm -f "/var/run/wireguard/$wgA.sock" "/var/run/wireguard/$wgB.sock"
	return 0
}
cleanup() {
	trap - EXIT INT TERM
	[ -n "$fgpid" ] && stop_pid "$fgpid"
	stop_all
	del_netns
	if [ "$etc_netns" != no ]; then
		rm -rf "/etc/netns/$nsA" "/etc/netns/$nsB"
		[ "$etc_netns" = yes-and-parent ] && rmdir /etc/netns 2>/dev/null
	fi
	rm -rf "$work"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

# --- build -------------------------------------------------------------------------------

snap_mod() { cat go.mod go.sum 2>/dev/null | sha256sum; }
mod_before=$(snap_mod)

commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
# Dirty: changed tracked files, or untracked ones (an untracked .go file is built too).
[ -z "$(git status --porcelain 2>/dev/null)" ] || commit+="-dirty"
ciped_version="not built: no ciped system selected"
if has ciped; then
	log "building ciped"
	go build -o "$work/ciped" . 2>"$work/build.log" || { cat "$work/build.log" >&2; die "go build of ciped failed"; }
	ciped_version=$("$work/ciped" --version 2>&1 | head -1)
fi

if has wireguard-go; then
	log "building wireguard-go"
	if ! go build -o "$work/wireguard-go" golang.zx2c4.com/wireguard 2>"$work/build.log"; then
		# go.sum lacks entries: resolve them in a copy of go.mod/go.sum, never in the repo's.
		mkdir -p "$work/mod" && cp go.mod go.sum "$work/mod/"
		GOFLAGS=-mod=mod go build -modfile="$work/mod/go.mod" -o "$work/wireguard-go" golang.zx2c4.com/wireguard \
			2>"$work/build.log" || { cat "$work/build.log" >&2; die "go build of wireguard-go failed"; }
	fi
	wg_version=$("$work/wireguard-go" --version | head -1)
fi
[ "$(snap_mod)" = "$mod_before" ] || log "warning: go.mod/go.sum changed while building (not by this script's writes: it never writes them)"

# --- keys and certificates (made once; each round restarts the processes) ------------------

umask 077
if has ciped; then
	"$work/ciped" genkey >"$work/ciped.key" || die "ciped genkey failed"
	cp "$work/ciped.key" "$work/options.a" && cp "$work/ciped.key" "$work/options.b"
	chmod 600 "$work/options.a" "$work/options.b"
fi
if has wireguard-go; then
	wg genkey >"$work/wg.a.key" && wg genkey >"$work/wg.b.key" || die "wg genkey failed"
	wg pubkey <"$work/wg.a.key" >"$work/wg.a.pub" && wg pubkey <"$work/wg.b.key" >"$work/wg.b.pub" || die "wg pubkey failed"
fi
if has openvpn-static; then
	openvpn --genkey secret "$work/ovpn-static.key" >/dev/null || die "openvpn --genkey failed"
fi
if has openvpn-tls; then
	(
		cd "$work" || exit 1
		exec 2>openssl.log
		set -e
		openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
			-subj "/CN=bench CA" -keyout ca.key -out ca.crt
		for who in server client; do
			openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
				-subj "/CN=bench $who" -keyout "$who.key" -out "$who.csr"
			printf 'basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=%s\n' \
				"$([ $who = server ] && echo serverAuth || echo clientAuth)" >"$who.ext"
			openssl x509 -req -in "$who.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 \
				-extfile "$who.ext" -out "$who.crt"
		done
	) || { cat "$work/openssl.log" >&2; die "making the OpenVPN certificates failed"; }
fi

# The namespaces see this machine's /etc: keep its /etc/cipe (options, scripts) out of ciped.
if has ciped && [ -d /etc/cipe ]; then
	etc_netns=yes
	[ -d /etc/netns ] || etc_netns=yes-and-parent
	mkdir -p "/etc/netns/$nsA/cipe" "/etc/netns/$nsB/cipe"
fi

# --- namespaces ------------------------------------------------------------------------

make_netns() {
	del_netns
	ip netns add "$nsA" && ip netns add "$nsB" &&
		ip link add ve0 netns "$nsA" type veth peer name ve1 netns "$nsB" &&
		ip -n "$nsA" addr add 198.18.0.1/24 dev ve0 &&
		ip -n "$nsB" addr add 198.18.0.2/24 dev ve1 &&
		ip -n "$nsA" link set lo up && ip -n "$nsB" link set lo up &&
		ip -n "$nsA" link set ve0 up && ip -n "$nsB" link set ve1 up
}
# (Only for foreground commands: started in the background through a function, a program
# would run under a subshell, and $! would not be its PID.)
inA() { ip netns exec "$nsA" "$@"; }
inB() { ip netns exec "$nsB" "$@"; }

# --- starting each system: sets tunA/tunB (PIDs) and dst (address to measure against) ---

tunA="" tunB="" dst=""
started() { # started PID NAME: remember PID, check that it is the expected program
	local pid=$1 want=$2 comm
	pids+=("$pid")
	sleep 0.05
	comm=$(cat "/proc/$pid/comm" 2>/dev/null) || { log "$want (PID $pid) exited at once"; return 1; }
	# ip netns exec execs the program, so $! is the program itself once it has exec'd.
	for _ in $(seq 50); do
		[ "$comm" = "$want" ] && return 0
		sleep 0.02
		comm=$(cat "/proc/$pid/comm" 2>/dev/null) || { log "$want (PID $pid) exited at once"; return 1; }
	done
	log "PID $pid is '$comm', not $want"
	return 1
}

start_ciped() { # start_ciped CIPHER|nokey
	local a=() b=()
	if [ "$1" = nokey ]; then
		a=(nokey) b=(nokey)
	else
		a=(-o "$work/options.a" "cipher=$1") b=(-o "$work/options.b" "cipher=$1")
	fi
	ip netns exec "$nsA" "$work/ciped" "${a[@]}" me=198.18.0.1:6789 peer=198.18.0.2:6789 \
		ipaddr=10.99.0.1 ptpaddr=10.99.0.2 >"$work/log.a" 2>&1 &
	tunA=$!
	started $tunA ciped || return 1
	ip netns exec "$nsB" "$work/ciped" "${b[@]}" me=198.18.0.2:6789 peer=198.18.0.1:6789 \
		ipaddr=10.99.0.2 ptpaddr=10.99.0.1 >"$work/log.b" 2>&1 &
	tunB=$!
	started $tunB ciped || return 1
	dst=10.99.0.2
}

start_wg() {
	local side ns ifc me peer port peerport other ep i
	for side in a b; do
		if [ $side = a ]; then ns=$nsA ifc=$wgA; else ns=$nsB ifc=$wgB; fi
		# -f: stay in the foreground (no re-exec of itself: $! stays the tunnel process);
		# WG_PROCESS_FOREGROUND=1 also silences the "use the kernel module" banner.
		WG_PROCESS_FOREGROUND=1 LOG_LEVEL=error ip netns exec "$ns" "$work/wireguard-go" -f "$ifc" \
			>"$work/log.$side" 2>&1 &
		if [ $side = a ]; then tunA=$!; else tunB=$!; fi
		started $! wireguard-go || return 1
	done
	for side in a b; do
		if [ $side = a ]; then
			ns=$nsA ifc=$wgA me=10.99.0.1 peer=10.99.0.2 port=51820 peerport=51821 other=b
			ep=198.18.0.2
		else
			ns=$nsB ifc=$wgB me=10.99.0.2 peer=10.99.0.1 port=51821 peerport=51820 other=a
			ep=198.18.0.1
		fi
		# The UAPI socket is /var/run/wireguard/<interface>.sock (shared by all namespaces,
		# hence different interface names on the two sides); wg finds it there.
		for i in $(seq 100); do
			[ -S "/var/run/wireguard/$ifc.sock" ] && break
			sleep 0.05
		done
		ip netns exec "$ns" wg set "$ifc" private-key "$work/wg.$side.key" listen-port $port \
			peer "$(cat "$work/wg.$other.pub")" endpoint "$ep:$peerport" allowed-ips "$peer/32" \
			>>"$work/log.$side" 2>&1 || { log "wg set $ifc failed"; return 1; }
		ip -n "$ns" addr add "$me/24" dev "$ifc" && ip -n "$ns" link set "$ifc" up ||
			{ log "configuring $ifc failed"; return 1; }
	done
	dst=10.99.0.2
}

start_openvpn() { # start_openvpn static|tls
	local side ns me peer local_if remote_if common extra=()
	for side in a b; do
		if [ $side = a ]; then ns=$nsA me=198.18.0.1 peer=198.18.0.2 local_if=10.99.0.1 remote_if=10.99.0.2
		else ns=$nsB me=198.18.0.2 peer=198.18.0.1 local_if=10.99.0.2 remote_if=10.99.0.1; fi
		common=(--dev tun --proto udp --local $me --lport 1194 --remote $peer --rport 1194
			--ifconfig $local_if $remote_if --disable-dco --verb 3)
		if [ "$1" = static ]; then
			# Static-key mode is deprecated in 2.6 (a warning) and goes away in 2.7.
			extra=(--secret "$work/ovpn-static.key" $([ $side = a ] && echo 0 || echo 1)
				--cipher AES-256-CBC --auth SHA256)
		else
			extra=(--ca "$work/ca.crt" --data-ciphers AES-256-GCM)
			if [ $side = b ]; then
				extra+=(--tls-server --dh none --cert "$work/server.crt" --key "$work/server.key")
			else
				extra+=(--tls-client --remote-cert-tls server --cert "$work/client.crt" --key "$work/client.key")
			fi
		fi
		ip netns exec "$ns" openvpn "${common[@]}" "${extra[@]}" >"$work/log.$side" 2>&1 &
		if [ $side = a ]; then tunA=$!; else tunB=$!; fi
		started $! openvpn || return 1
	done
	dst=10.99.0.2
}

start_system() {
	tunA="" tunB=""
	case $1 in
	veth) dst=198.18.0.2 ;;
	ciped-aes) start_ciped aes-gcm ;;
	ciped-chacha) start_ciped chacha20-poly1305 ;;
	ciped-nokey) start_ciped nokey ;;
	wireguard-go) start_wg ;;
	openvpn-static) start_openvpn static ;;
	openvpn-tls) start_openvpn tls ;;
	esac
}

# --- measuring ---------------------------------------------------------------------------

hz=$(getconf CLK_TCK)
cpu_ticks() { # utime+stime of a PID (fields 14 and 15; the comm field may hold blanks)
	local rest
	rest=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
	rest=${rest##*) }
	awk '{print $12 + $13}' <<<"$rest"
}
hwm_kb() { awk '/^VmHWM:/ {print $2}' "/proc/$1/status" 2>/dev/null; }
tunnel_ticks() { # CPU ticks of both tunnel processes together (0 without a tunnel)
	local a b
	[ -n "$tunA" ] || { echo 0; return 0; }
	a=$(cpu_ticks "$tunA") && b=$(cpu_ticks "$tunB") || return 1
	echo $((a + b))
}
alive() { local p; for p in "$@"; do ours "$p" || return 1; done; }

srvpid=""
iperf_server() { # (re)start the iperf3 server in B unless it is running; wait until it listens
	local i
	[ -n "$srvpid" ] && ours "$srvpid" && return 0
	[ -n "$srvpid" ] && log "the iperf3 server (PID $srvpid) is gone; starting another"
	ip netns exec "$nsB" iperf3 -s -B "$dst" >>"$work/iperf-server.log" 2>&1 &
	srvpid=$!
	pids+=("$srvpid")
	for i in $(seq 100); do
		inB ss -Hltn 'sport = :5201' 2>/dev/null | grep -q . && return 0
		sleep 0.05
	done
	log "the iperf3 server does not listen on $dst:5201"
	return 1
}
iperf() { # iperf STREAMS OUT.json: run the client in A against the server in B; one retry
	local try rc
	for try in 1 2; do
		iperf_server || return 1
		cpu0=$(tunnel_ticks) || { log "a tunnel process is gone"; return 1; }
		run_fg "$2" timeout $((DURATION + 30)) ip netns exec "$nsA" iperf3 -c "$dst" -t "$DURATION" -P "$1" -J
		rc=$?
		cpu1=$(tunnel_ticks) || { log "a tunnel process is gone"; return 1; }
		jq -e '.end.sum_received.bytes > 0' "$2" >/dev/null 2>&1 && [ $rc -eq 0 ] && return 0
		log "iperf3 -P $1 to $dst failed (exit $rc, try $try of 2): $(jq -r '.error // empty' "$2" 2>/dev/null || head -c 300 "$2")"
		alive ${tunA:+"$tunA" "$tunB"} || return 1 # no use retrying without a tunnel
		sleep 1
	done
	return 1
}

results=$work/results.tsv # system round metric value
: >"$results"
failures=$work/failures.tsv # system round reason
: >"$failures"
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$results"; }

measure() { # measure SYSTEM ROUND
	local sys=$1 round=$2 i out bytes
	make_netns || { log "making the namespaces failed"; return 1; }
	start_system "$sys" || return 1
	# Let the tunnel come up: ping until it answers, bounded.
	local deadline=$((SECONDS + UP_TIMEOUT)) up=no
	while [ $SECONDS -lt $deadline ]; do
		if [ -n "$tunA" ] && ! alive "$tunA" "$tunB"; then log "a tunnel process exited"; break; fi
		inA ping -n -q -c 1 -W 1 "$dst" >/dev/null 2>&1 && { up=yes; break; }
		sleep 0.1
	done
	[ $up = yes ] || { log "$sys: $dst never answered a ping within ${UP_TIMEOUT} s"; return 1; }
	# Note what data protection A's log says was agreed (a warning if it says nothing).
	local pat="" seen=""
	case $sys in
	ciped-nokey) pat='unencrypted' ;;
	ciped-*) pat='cipher [A-Za-z0-9-]+' ;;
	openvpn-*) pat="Data Channel: cipher '[^']*'(, auth '[^']*')?" ;;
	esac
	if [ -n "$pat" ]; then
		for i in $(seq 20); do
			seen=$(grep -Eoi -m1 "$pat" "$work/log.a" 2>/dev/null) && break
			sleep 0.1
		done
		[ -n "$seen" ] || log "warning: $sys: A's log does not show the cipher (looked for /$pat/)"
		record "$sys" "$round" agreed "${seen:-?}"
	fi

	srvpid=""
	: >"$work/iperf-server.log"
	iperf_server || return 1

	# RTT on the idle link (after a few warm-up pings).
	inA ping -n -q -c 5 -i 0.02 "$dst" >/dev/null 2>&1
	out=$(inA ping -n -q -c "$PINGS" -i 0.02 "$dst" 2>&1) || { log "$sys: ping failed: $out"; return 1; }
	record "$sys" "$round" rtt "$(awk -F/ '/^(rtt|round-trip)/ {print $5}' <<<"$out")"
	sleep 0.5

	# TCP, one stream; iperf reads the tunnel processes' CPU time right around it.
	iperf 1 "$work/tcp1.json" || return 1
	record "$sys" "$round" tcp1 "$(jq -r '.end.sum_received.bits_per_second / 1e9 * 1000 | round / 1000' "$work/tcp1.json")"
	record "$sys" "$round" retr1 "$(jq '.end.sum_sent.retransmits // 0' "$work/tcp1.json")"
	if [ -n "$tunA" ]; then
		bytes=$(jq '.end.sum_received.bytes' "$work/tcp1.json")
		record "$sys" "$round" cpugb "$(awk -v t=$((cpu1 - cpu0)) -v hz="$hz" -v b="$bytes" 'BEGIN {printf "%.4f", (t / hz) / (b / 1e9)}')"
	fi
	sleep 1

	iperf 4 "$work/tcp4.json" || return 1
	record "$sys" "$round" tcp4 "$(jq -r '.end.sum_received.bits_per_second / 1e9 * 1000 | round / 1000' "$work/tcp4.json")"

	if [ -n "$tunA" ]; then
		alive "$tunA" "$tunB" || { log "$sys: a tunnel process exited during the runs"; return 1; }
		local ha hb
		ha=$(hwm_kb "$tunA") hb=$(hwm_kb "$tunB")
		record "$sys" "$round" rss "$(awk -v a="$ha" -v b="$hb" 'BEGIN {m = a > b ? a : b; printf "%.1f", m / 1024}')"
	fi
	return 0
}

# --- the rounds --------------------------------------------------------------------------

# How busy the machine is besides us: CPU use in the second before we start, and CPU
# time stolen by the hypervisor during the run (/proc/stat's cpu line: user nice system
# idle iowait irq softirq steal ...).
cpu_pct() { # cpu_pct "STAT-LINE-BEFORE" "STAT-LINE-AFTER": busy% and steal% in between
	printf '%s\n%s\n' "$1" "$2" | awk '
		{ t[NR] = 0; for (i = 2; i <= 9; i++) t[NR] += $i; idle[NR] = $5 + $6; st[NR] = $9 }
		END { d = t[2] - t[1]; if (d <= 0) d = 1
			printf "%.0f %.1f\n", 100 * (d - (idle[2] - idle[1])) / d, 100 * (st[2] - st[1]) / d }'
}
stat0=$(head -1 /proc/stat)
sleep 1
stat1=$(head -1 /proc/stat)
read -r busy0 _ <<<"$(cpu_pct "$stat0" "$stat1")"
[ "$busy0" -gt 10 ] &&
	log "warning: the CPUs were ${busy0}% busy before starting: something else is running, numbers will be noisy"
stat0=$stat1
t0=$SECONDS
n=${#systems[@]}
log "ciped $commit, $RUNS round(s) of: ${systems[*]}; TCP tests of ${DURATION} s"
for round in $(seq "$RUNS"); do
	for k in $(seq 0 $((n - 1))); do
		sys=${systems[$(((round - 1 + k) % n))]}
		log "round $round/$RUNS: $sys"
		if ! measure "$sys" "$round"; then
			printf '%s\t%s\n' "$sys" "$round" >>"$failures"
			log "$sys failed in round $round; its logs:"
			for side in a b; do
				[ -s "$work/log.$side" ] && tail -n 20 "$work/log.$side" | sed "s/^/    $side: /" >&2
			done
		fi
		stop_all
		del_netns
		rm -f "$work/log.a" "$work/log.b"
	done
done
elapsed=$((SECONDS - t0))
read -r _ steal <<<"$(cpu_pct "$stat0" "$(head -1 /proc/stat)")"

# --- the report --------------------------------------------------------------------------

stat() { # stat SYSTEM METRIC DECIMALS: "median (min–max)", or — if there are no values
	awk -F'\t' -v s="$1" -v m="$2" '$1 == s && $3 == m {print $4}' "$results" | sort -g |
		awk -v d="$3" '{v[NR] = $1} END {
			if (NR == 0) { print "—"; exit }
			med = NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
			if (NR == 1) printf "%.*f\n", d, med
			else printf "%.*f (%.*f–%.*f)\n", d, med, d, v[1], d, v[NR]
		}'
}
median() { # median SYSTEM METRIC: plain number, or empty
	awk -F'\t' -v s="$1" -v m="$2" '$1 == s && $3 == m {print $4}' "$results" | sort -g |
		awk '{v[NR] = $1} END { if (NR) print NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
ratio() { # ratio A B: A/B as "1.23×", or —
	awk -v a="$1" -v b="$2" 'BEGIN { if (a == "" || b == "" || b + 0 == 0) print "—"; else printf "%.2f×\n", a / b }'
}

report() {
	echo "# ciped benchmark, $(date '+%Y-%m-%d %H:%M:%S %Z')"
	echo
	echo "- kernel: $(uname -r)"
	echo "- CPU: $(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo), nproc $(nproc)"
	echo "- Go: $(go version)"
	echo "- ciped: commit $commit ($ciped_version)"
	[ -n "${wg_version:-}" ] && echo "- $wg_version (golang.zx2c4.com/wireguard $(awk '/golang.zx2c4.com\/wireguard / {print $2; exit}' go.mod))"
	has openvpn && echo "- $(openvpn --version 2>/dev/null | head -1 | cut -d' ' -f1-2), $(openssl version)"
	echo "- iperf3: $(iperf3 --version 2>/dev/null | head -1)"
	echo "- command: \`$cmdline\`"
	echo "- $RUNS round(s), TCP tests of $DURATION s, ping -c $PINGS -i 0.02; took ${elapsed} s"
	echo "- CPU busy in the second before the run: ${busy0}% (above 10%: something else was running); CPU steal during the run: ${steal}%"
	echo
	echo "Each cell: median (min–max) over the rounds. Throughput: iperf3 receiver, Gbit/s."
	echo "CPU per GB: user+system CPU seconds of both tunnel processes per 1e9 bytes received"
	echo "in the 1-stream test. Peak RSS: VmHWM of the larger of the two tunnel processes, MiB."
	echo
	echo "| system | TCP 1 stream (Gbit/s) | TCP 4 streams (Gbit/s) | ping RTT (ms) | tunnel CPU (s/GB) | peak RSS (MiB) | failed rounds |"
	echo "|---|---|---|---|---|---|---|"
	local s f
	for s in "${systems[@]}"; do
		f=$(awk -F'\t' -v s="$s" '$1 == s' "$failures" | wc -l)
		echo "| $s | $(stat "$s" tcp1 2) | $(stat "$s" tcp4 2) | $(stat "$s" rtt 3) | $(stat "$s" cpugb 2) | $(stat "$s" rss 1) | $f/$RUNS |"
	done
	if has wireguard-go && has ciped; then
		echo
		echo "ciped against wireguard-go (ratio of medians; throughput above 1× is faster, CPU, RTT and RSS above 1× are more):"
		echo
		echo "| system | TCP 1 stream | TCP 4 streams | CPU per GB | ping RTT | peak RSS |"
		echo "|---|---|---|---|---|---|"
		for s in "${systems[@]}"; do
			[[ $s == ciped-* ]] || continue
			echo "| $s | $(ratio "$(median "$s" tcp1)" "$(median wireguard-go tcp1)") | $(ratio "$(median "$s" tcp4)" "$(median wireguard-go tcp4)") | $(ratio "$(median "$s" cpugb)" "$(median wireguard-go cpugb)") | $(ratio "$(median "$s" rtt)" "$(median wireguard-go rtt)") | $(ratio "$(median "$s" rss)" "$(median wireguard-go rss)") |"
		done
	fi
}

mkdir -p "$repo/bench/results"
out="$repo/bench/results/$(date +%Y-%m-%d-%H%M%S).md"
report | tee "$out"
{
	echo
	echo "## Raw values"
	echo
	echo "One line per system, round and metric (tcp1, tcp4: Gbit/s; retr1: TCP retransmits in"
	echo "the 1-stream test; rtt: ms; cpugb: s/GB; rss: MiB)."
	echo
	echo '```'
	sort -k1,1 -k3,3 -k2,2n "$results"
	[ -s "$failures" ] && { echo "failed (system, round):"; cat "$failures"; }
	echo '```'
} >>"$out"
echo
echo "(saved to ${out#"$repo/"})"
[ -s "$failures" ] && exit 1
exit 0
