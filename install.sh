#!/bin/sh
# install.sh: build ciped and install it.
#
#     sudo ./install.sh                  # into / (PREFIX=/usr/local)
#     DESTDIR=/tmp/stage ./install.sh    # into a staging tree, for packaging or a look
#
# Installs:
#   $PREFIX/sbin/ciped                          the program
#   /etc/cipe/ip-up, /etc/cipe/ip-down          the link scripts   (an existing one is kept)
#   /etc/cipe/ip-up.routes, ip-up.firewall, ... the samples' scripts, where the sample
#                                               options files name them (likewise kept)
#   /etc/cipe/samples/                          options files and scripts to copy from
#                                               (an existing file is kept)
#   $PREFIX/lib/systemd/system/ciped@.service   the template unit: ciped@NAME reads
#                                               /etc/cipe/options.NAME
#   $PREFIX/share/man/man8/ciped.8              the manual
#   $PREFIX/share/doc/ciped/PROTOCOL.md         the wire protocol (the manual points to it)
# It never creates or changes an options file in /etc/cipe: those hold the keys.
# `go install .` in this directory installs the program alone (into $GOBIN).
set -eu

cd "$(dirname "$0")"
PREFIX=${PREFIX:-/usr/local}
DESTDIR=${DESTDIR:-}
command -v go >/dev/null 2>&1 || PATH=$PATH:/usr/local/go/bin
command -v go >/dev/null 2>&1 || { echo "install.sh: Go is needed to build ciped (https://go.dev/dl/)" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "building ciped"
go build -trimpath -o "$work/ciped" .

# put MODE SOURCE TARGET: install a file, replacing what is there.
put() {
	install -D -m "$1" "$2" "$DESTDIR$3"
	echo "  installed $3"
}

# keep MODE SOURCE TARGET: install a file unless one is there already.
keep() {
	if [ -e "$DESTDIR$3" ] || [ -L "$DESTDIR$3" ]; then
		echo "  kept      $3 (exists; the new one is $2)"
	else
		put "$@"
	fi
}

echo "installing into ${DESTDIR:-/}"
put 0755 "$work/ciped" "$PREFIX/sbin/ciped"
install -d -m 0755 "$DESTDIR/etc/cipe"
keep 0755 ip-up /etc/cipe/ip-up
keep 0755 ip-down /etc/cipe/ip-down
# The samples' scripts where the sample options files name them.
for f in samples/ip-up.* samples/ip-down.*; do
	keep 0755 "$f" "/etc/cipe/${f#samples/}"
done
install -d -m 0755 "$DESTDIR/etc/cipe/samples"
for f in samples/*; do
	case "$f" in
	samples/demo) continue ;;
	samples/options.*) mode=0600 ;;
	samples/*.service | samples/*.timer)
		mode=0644
		sed "s|/usr/local/sbin/ciped|$PREFIX/sbin/ciped|" "$f" > "$work/${f#samples/}"
		keep "$mode" "$work/${f#samples/}" "/etc/cipe/$f"
		continue
		;;
	*) mode=0755 ;;
	esac
	keep "$mode" "$f" "/etc/cipe/$f"
done
sed "s|/usr/local/sbin/ciped|$PREFIX/sbin/ciped|" ciped@.service > "$work/ciped@.service"
put 0644 "$work/ciped@.service" "$PREFIX/lib/systemd/system/ciped@.service"
put 0644 ciped.8 "$PREFIX/share/man/man8/ciped.8"
put 0644 PROTOCOL.md "$PREFIX/share/doc/ciped/PROTOCOL.md"

if [ -z "$DESTDIR" ] && [ -d /run/systemd/system ]; then
	systemctl daemon-reload
fi
cat <<EOF
done. Next, for a link named office-b:
    umask 077; $PREFIX/sbin/ciped genkey > /etc/cipe/options.office-b
    (then add me, peer, ipaddr, ptpaddr: see /etc/cipe/samples/options.office)
    systemctl enable --now ciped@office-b
    ciped status
EOF
