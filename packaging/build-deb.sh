#!/bin/sh
# build-deb.sh [OUTDIR]: build the Debian package ciped_VERSION_ARCH.deb (in OUTDIR,
# default ./dist) from this tree, with go and dpkg-deb, and print its path.
#
# Why dpkg-deb from a staged tree rather than debian/ and dpkg-buildpackage: ciped is
# packaged by its own project, not uploaded to Debian, so a source package, .changes and
# a debian/changelog rewritten for every snapshot buy nothing; debhelper would not write
# the maintainer scripts either (dh_installsystemd skips template units such as
# ciped@.service), and what it does besides (gzip the manual and changelog, strip,
# md5sums, conffiles, Installed-Size, shlibs) is the few lines below, checked by lintian.
# The build is reproducible: two builds of one commit give the same bytes.
#
# Needs: go (go.mod's version), gcc, dpkg-deb and dpkg-shlibdeps (dpkg-dev), strip
# (binutils), gzip, git (for the version; an exported tree uses VERSION alone).
# DEB_REVISION (default 1) is the Debian revision.
set -eu
cd "$(dirname "$0")/.."
command -v go >/dev/null 2>&1 || PATH=$PATH:/usr/local/go/bin
for tool in go gcc dpkg-deb dpkg-shlibdeps strip gzip; do
	if ! command -v "$tool" >/dev/null 2>&1; then
		echo "build-deb.sh: $tool is missing (apt-get install golang/gcc/dpkg-dev/binutils/gzip)" >&2
		exit 1
	fi
done
pkg=ciped
upstream=$(packaging/version.sh)
version=$upstream-${DEB_REVISION:-1}
arch=$(dpkg --print-architecture)
out=${1:-dist}
mkdir -p "$out"
out=$(cd "$out" && pwd)
# File times and the changelog's date are the commit's, so a rebuild is byte-identical.
SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}
export SOURCE_DATE_EPOCH
commit=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/root
umask 022

# Debian's hardening: a position-independent executable with full RELRO and immediate
# binding, its C parts (cgo's glue to libc; ciped uses the system's resolver, as when
# built with go build) fortified; -s -w: no symbol table or DWARF. The version the
# binary prints is the package's.
CGO_CFLAGS="-O2 -D_FORTIFY_SOURCE=2" CGO_ENABLED=1 go build -trimpath -buildvcs=false -buildmode=pie \
	-ldflags "-s -w -X main.version=$version -linkmode=external -extldflags=-Wl,-z,relro,-z,now" \
	-o "$work/$pkg" .

install -D -m 0755 "$work/$pkg" "$root/usr/sbin/$pkg"
strip --remove-section=.comment --remove-section=.note "$root/usr/sbin/$pkg"
install -d "$root/lib/systemd/system"
sed "s|/usr/local/sbin/$pkg|/usr/sbin/$pkg|" "$pkg@.service" > "$root/lib/systemd/system/$pkg@.service"
chmod 0644 "$root/lib/systemd/system/$pkg@.service"
# /etc/cipe: the default scripts, and the samples' scripts where the sample options
# files name them; all conffiles. No options file: those hold the keys.
install -D -m 0755 ip-up "$root/etc/cipe/ip-up"
install -m 0755 ip-down "$root/etc/cipe/ip-down"
for f in samples/ip-up.* samples/ip-down.*; do
	install -m 0755 "$f" "$root/etc/cipe/"
done
install -d "$root/usr/share/man/man8"
gzip -9n < "$pkg.8" > "$root/usr/share/man/man8/$pkg.8.gz"
doc=$root/usr/share/doc/$pkg
install -D -m 0644 PROTOCOL.md "$doc/PROTOCOL.md"
install -m 0644 README "$doc/README"
install -d "$doc/samples"
for f in samples/*; do
	case $f in
	samples/demo) continue ;; # builds ciped from source: not for the package
	esac
	# for reading and copying; the scripts are installed runnable in /etc/cipe
	install -m 0644 "$f" "$doc/samples/"
done
sed -i -e "s|/usr/local/sbin/$pkg|/usr/sbin/$pkg|" -e "s|/etc/cipe/samples/|/usr/share/doc/$pkg/samples/|" \
	"$doc/samples/ciped-metrics.service" "$doc/samples/ciped-metrics.timer"
install -m 0644 packaging/copyright "$doc/copyright"
sed -e "s|@VERSION@|$version|" -e "s|@COMMIT@|$commit|" \
	-e "s|@DATE@|$(date -u -R -d "@$SOURCE_DATE_EPOCH")|" packaging/changelog.in |
	gzip -9n > "$doc/changelog.Debian.gz"
chmod 0644 "$doc/changelog.Debian.gz"
install -D -m 0644 packaging/lintian-overrides "$root/usr/share/lintian/overrides/$pkg"

# DEBIAN/: control, conffiles, md5sums (of all but the conffiles), maintainer scripts.
install -d "$root/DEBIAN"
(cd "$root" && find etc -type f | LC_ALL=C sort | sed 's|^|/|') > "$root/DEBIAN/conffiles"
(cd "$root" && find usr lib -type f | LC_ALL=C sort | xargs md5sum) > "$root/DEBIAN/md5sums"
for s in postinst prerm postrm; do
	install -m 0755 "packaging/$s" "$root/DEBIAN/$s"
done
# Installed-Size as dpkg-gencontrol counts it: KiB per file, rounded up, and 1 per other entry.
size=$(cd "$root" && find . -path ./DEBIAN -prune -o ! -path . -printf '%y %s\n' |
	awk '$1 == "f" { s += int(($2 + 1023) / 1024) } $1 != "f" { s += 1 } END { print s }')
# The binary links libc alone; the symbols it uses decide the least version.
depends=$(cd "$work" && mkdir -p debian && : > debian/control &&
	dpkg-shlibdeps -O "$root/usr/sbin/$pkg" 2>/dev/null | sed -n 's/^shlibs:Depends=//p')
if [ -z "$depends" ]; then
	echo "build-deb.sh: dpkg-shlibdeps found no dependency of usr/sbin/$pkg" >&2
	exit 1
fi
sed -e "s|@VERSION@|$version|" -e "s|@ARCH@|$arch|" -e "s|@INSTALLED_SIZE@|$size|" \
	-e "s|@DEPENDS@|$depends|" packaging/control.in > "$root/DEBIAN/control"

find "$root" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
deb=$out/${pkg}_${version}_$arch.deb
dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null
echo "$deb"
