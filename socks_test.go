package main

import (
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestSocksUDPHeader(t *testing.T) {
	for _, a := range []netip.AddrPort{netip.MustParseAddrPort("198.18.1.2:6000"), netip.MustParseAddrPort("[2001:db8::2]:443")} {
		h := putSocksAddr([]byte{0, 0, 0}, a)
		if len(h) != socksHeaderSize(a.Addr()) {
			t.Fatalf("%v: header of %d bytes", a, len(h))
		}
		if got, ok := parseSocksUDPHeader(h); !ok || got != a {
			t.Fatalf("%v: parsed back as %v %v", a, got, ok)
		}
	}
	for _, bad := range [][]byte{
		{0, 0, 1, socksAtypIPv4, 1, 2, 3, 4, 0, 1}, // a fragment
		{0, 1, 0, socksAtypIPv4, 1, 2, 3, 4, 0, 1}, // reserved bits
		{0, 0, 0, socksAtypDomain, 1, 2, 3, 4, 0, 1},
		{0, 0, 0, socksAtypIPv6, 1, 2, 3, 4, 0, 1}, // too short for IPv6
	} {
		if _, ok := parseSocksUDPHeader(bad); ok {
			t.Errorf("%x accepted", bad)
		}
	}
}

// fakeProxy answers one SOCKS5 conversation with the given method choice and reply code
// (and relay address), then keeps the connection open until the test ends.
func fakeProxy(t *testing.T, method, code byte, relay []byte) netip.AddrPort {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		greet := make([]byte, 3)
		if _, err := io.ReadFull(c, greet); err != nil {
			return
		}
		c.Write([]byte{5, method})
		if method != 0 {
			return
		}
		req := make([]byte, 10)
		if _, err := io.ReadFull(c, req); err != nil || req[1] != socksCmdUDPAssociate {
			return
		}
		c.Write(append([]byte{5, code, 0}, relay...))
		io.Copy(io.Discard, c)
	}()
	return ln.Addr().(*net.TCPAddr).AddrPort()
}

func TestSocksAssociate(t *testing.T) {
	local := netip.MustParseAddrPort("127.0.0.1:6000")
	server := fakeProxy(t, 0, 0, []byte{socksAtypIPv4, 0, 0, 0, 0, 0x17, 0x70})
	c, relay, err := socksAssociate(server, local)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	if relay != netip.AddrPortFrom(server.Addr(), 6000) {
		t.Errorf("relay %v: an unspecified relay address means the proxy's own", relay)
	}
	for _, c := range []struct {
		method, code byte
		want         string
	}{
		{0xff, 0, "wants authentication"},
		{2, 0, "chose method 2"},
		{0, 7, "command not supported (the proxy does not relay UDP)"},
		{0, 2, "not allowed by ruleset"},
	} {
		server := fakeProxy(t, c.method, c.code, []byte{socksAtypIPv4, 127, 0, 0, 1, 0x17, 0x70})
		if _, _, err := socksAssociate(server, local); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("method %d code %d: %v, want %q", c.method, c.code, err, c.want)
		}
	}
	// Not a SOCKS server at all.
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err == nil {
			c.Write([]byte("HTTP/1.1 400 Bad Request\r\n\r\n"))
			c.Close()
		}
	}()
	if _, _, err := socksAssociate(ln.Addr().(*net.TCPAddr).AddrPort(), local); err == nil || !strings.Contains(err.Error(), "not a SOCKS5 server") {
		t.Errorf("HTTP server: %v", err)
	}
}

// TestE2ESocks: a reaches b only through a SOCKS5 proxy (Debian's dante-server, in a
// namespace between them that does not forward): the link comes up through the UDP
// relay, carries ping and TCP, and when the proxy restarts (the association is lost, the
// relay port changes) ciped associates again and the link carries on.
func TestE2ESocks(t *testing.T) {
	requireRoot(t)
	needTool(t, "danted", "dante-server")
	p := newRoutedPair(t, 1500)
	nsA, nsS, nsB := p.a, p.router, p.b
	mustRun(t, "ip", "netns", "exec", nsS, "sysctl", "-qw", "net.ipv4.ip_forward=0") // only the relay gets through
	dir := t.TempDir()
	conf := filepath.Join(dir, "danted.conf")
	if err := os.WriteFile(conf, []byte(`logoutput: `+filepath.Join(dir, "danted.log")+`
internal: 198.18.0.254 port = 1080
external: 198.18.1.254
socksmethod: none
clientmethod: none
user.privileged: root
user.unprivileged: root
client pass { from: 198.18.0.0/24 to: 0.0.0.0/0 }
socks pass { from: 198.18.0.0/24 to: 0.0.0.0/0 command: udpassociate }
socks pass { from: 0.0.0.0/0 to: 198.18.0.0/24 command: udpreply }
`), 0o600); err != nil {
		t.Fatal(err)
	}
	// danted forks workers that keep relaying if only its main process dies: it runs in a
	// session of its own and is stopped by its process group.
	startProxy := func() *exec.Cmd {
		cmd := exec.Command("ip", "netns", "exec", nsS, "danted", "-f", conf, "-p", filepath.Join(dir, "danted.pid"))
		cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		waitFor(t, "danted listening", linkBound, func() bool {
			return inNetns(nsA, func() error {
				c, err := net.DialTimeout("tcp", "198.18.0.254:1080", time.Second)
				if err == nil {
					c.Close()
				}
				return err
			}) == nil
		})
		return cmd
	}
	stopProxy := func(cmd *exec.Cmd) {
		syscall.Kill(-cmd.Process.Pid, syscall.SIGTERM)
		cmd.Wait()
	}
	proxy := startProxy()
	t.Cleanup(func() { stopProxy(proxy) })

	a := startDaemon(t, "ciped A", nsA, "-o", keyFile(t, dir, "oa", testKey), "me=198.18.0.1:6000",
		"peer=198.18.1.2:6000", "socks=198.18.0.254:1080", "ipaddr="+e2eTunnelA, "ptpaddr="+e2eTunnelB, "debug")
	b := startDaemon(t, "ciped B", nsB, "-o", keyFile(t, dir, "ob", testKey), "me=198.18.1.2:6000",
		"peer=0.0.0.0:0", "ipaddr="+e2eTunnelB, "ptpaddr="+e2eTunnelA, "debug")
	a.waitLog(t, `SOCKS proxy 198.18.0.254:1080 relays for us at 198.18.0.254:\d+`, linkBound)
	a.waitLog(t, "link up", linkBound)
	b.waitLog(t, `link up: peer 198.18.1.254:\d+`, linkBound) // b sees the proxy, not a
	for _, c := range []struct{ ns, to string }{{nsA, e2eTunnelB}, {nsB, e2eTunnelA}} {
		if got := ping(t, c.ns, c.to, 3, "0.2"); got != 3 {
			t.Errorf("ping %s through the proxy: %d of 3", c.to, got)
		}
	}
	start := time.Now()
	if sent, got := transfer(t, nsA, nsB, e2eTunnelB, 5<<20, nil, 0); sent != got {
		t.Fatalf("5 MB through the proxy: sent %x, received %x", sent, got)
	}
	t.Logf("5 MB through the proxy in %v", time.Since(start).Round(time.Millisecond))

	stopProxy(proxy)
	a.waitLog(t, "SOCKS proxy 198.18.0.254:1080 closed the association", linkBound)
	proxy = startProxy()
	restarted := time.Now()
	waitFor(t, "a second association", linkBound, func() bool { return a.count("relays for us at") >= 2 })
	waitFor(t, "ping through the new association", linkBound, func() bool { return ping(t, nsA, e2eTunnelB, 1, "0.2") == 1 })
	t.Logf("a ping went through %v after the proxy was listening again", time.Since(restarted).Round(time.Millisecond))
	if got := ping(t, nsB, e2eTunnelA, 3, "0.2"); got != 3 {
		t.Errorf("b to a after the proxy restarted: %d of 3", got)
	}
}

// FuzzSocksParse feeds untrusted bytes to both SOCKS parsers: the header of a datagram
// from the relay and the address in a proxy's reply. Neither may panic; what the header
// parser accepts must encode back to the same bytes, and an IPv4-mapped IPv6 address
// comes out as IPv4.
func FuzzSocksParse(f *testing.F) {
	f.Add(putSocksAddr([]byte{0, 0, 0}, netip.MustParseAddrPort("198.18.1.2:6000")))
	f.Add(putSocksAddr([]byte{0, 0, 0}, netip.MustParseAddrPort("[2001:db8::2]:443")))
	f.Add([]byte{0, 0, 0, socksAtypIPv6, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 198, 18, 0, 1, 0, 1})
	f.Add([]byte{0, 0, 0, socksAtypDomain, 3, 'a', 'b', 'c', 0, 1})
	f.Fuzz(func(t *testing.T, b []byte) {
		if a, ok := parseSocksUDPHeader(b); ok {
			again := putSocksAddr([]byte{0, 0, 0}, a)
			mapped := b[3] == socksAtypIPv6 && a.Addr().Is4()
			if !mapped && string(again) != string(b) {
				t.Fatalf("%x parsed as %v, which encodes as %x", b, a, again)
			}
			if mapped && a.Addr() != netip.AddrFrom16([16]byte(b[4:20])).Unmap() {
				t.Fatalf("%x parsed as %v", b, a)
			}
		}
		if len(b) < 3 {
			return
		}
		a, err := readSocksAddr(strings.NewReader(string(b[3:])))
		if err == nil {
			if !a.IsValid() || a.Addr().Is4In6() {
				t.Fatalf("%x: reply address %v", b[3:], a)
			}
			if want := socksHeaderSize(a.Addr()) - 3; len(b)-3 < want && !(b[3] == socksAtypIPv6 && len(b)-3 >= socksUDPHeaderIPv6-3) {
				t.Fatalf("%x: %v read from fewer bytes than its type needs", b[3:], a)
			}
		}
	})
}
