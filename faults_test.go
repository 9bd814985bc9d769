package main

// End-to-end fault tests: what a link survives, and how fast (README, "Failure model").
// See netns_test.go for the helpers and addresses.

import (
	"bytes"
	"crypto/rand"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// nft loads a ruleset into a namespace.
func nft(t *testing.T, ns, rules string) {
	t.Helper()
	cmd := exec.Command("ip", "netns", "exec", ns, "nft", "-f", "-")
	cmd.Stdin = strings.NewReader(rules)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("nft in %s: %v\n%s\n%s", ns, err, out, rules)
	}
}

func requireNft(t *testing.T) {
	t.Helper()
	if _, err := exec.LookPath("nft"); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal("needs nft (nftables), and in CI this test must run")
		}
		t.Skip("needs nft (nftables); skipped")
	}
}

// attachNamespace adds a namespace (b's name and suffix) joined to b by a veth pair,
// devB in b with subnet.1/24 and devC in the new one with subnet.2/24, all up; it is
// removed when the test ends.
func attachNamespace(t *testing.T, l *e2eLink, suffix, devB, devC, subnet string) string {
	t.Helper()
	c := l.ns.b + suffix
	mustRun(t, "ip", "netns", "add", c)
	t.Cleanup(func() { exec.Command("ip", "netns", "del", c).Run() })
	mustRun(t, "ip", "link", "add", devB, "netns", l.ns.b, "type", "veth", "peer", "name", devC, "netns", c)
	mustRun(t, "ip", "-n", l.ns.b, "addr", "add", subnet+".1/24", "dev", devB)
	mustRun(t, "ip", "-n", c, "addr", "add", subnet+".2/24", "dev", devC)
	for _, d := range [][2]string{{l.ns.b, devB}, {c, devC}, {c, "lo"}} {
		mustRun(t, "ip", "-n", d[0], "link", "set", d[1], "up")
	}
	return c
}

// thirdNamespace adds a namespace c attached to b's carrier side (c: 198.18.2.2, b:
// 198.18.2.1) that routes to b's carrier address: an outsider on the carrier network.
func thirdNamespace(t *testing.T, l *e2eLink) string {
	t.Helper()
	c := attachNamespace(t, l, "x", "ve4", "ve5", "198.18.2")
	mustRun(t, "ip", "-n", c, "route", "add", "198.18.0.0/24", "via", "198.18.2.1")
	return c
}

// udpFrom opens a UDP socket inside a namespace.
func udpFrom(t *testing.T, ns string) *net.UDPConn {
	t.Helper()
	var c *net.UDPConn
	if err := inNetns(ns, func() (err error) {
		c, err = net.ListenUDP("udp4", &net.UDPAddr{})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// finalCount reads one counter from a stopped daemon's last "stopped:" line.
func finalCount(t *testing.T, d *daemon, what string) int {
	t.Helper()
	log := d.log.String()
	i := strings.LastIndex(log, "stopped: ")
	if i < 0 {
		t.Fatalf("%s logged no final counters", d.name)
	}
	m := regexp.MustCompile(`(\d+) ` + regexp.QuoteMeta(what)).FindStringSubmatch(log[i:])
	if m == nil {
		t.Fatalf("%s's final line has no %q: %s", d.name, what, log[i:])
	}
	n, _ := strconv.Atoi(m[1])
	return n
}

// TestE2ELoss: with 10% of carrier datagrams lost each way (nft in a's namespace), the
// link comes up, a TCP transfer completes intact, and rekeys keep happening.
func TestE2ELoss(t *testing.T) {
	requireRoot(t)
	requireNft(t)
	l := &e2eLink{}
	// Without UDP GSO and GRO, so that nft sees (and drops) single datagrams.
	l.extraA = []string{"tokey=2", "tokxc=1", "udpgso=no", "udpgro=no"}
	l.extraB = []string{"tokey=2", "tokxc=1", "udpgso=no", "udpgro=no"}
	l.ns = newNetnsPair(t, false)
	// On the device, both ways: a drop there is silent, as on the path (a drop in the
	// output hook would fail the send with EPERM instead).
	nft(t, l.ns.a, `table netdev loss {
		chain in { type filter hook ingress device "ve0" priority 0; udp dport 6000 numgen random mod 10 0 drop; }
		chain out { type filter hook egress device "ve0" priority 0; udp dport 6000 numgen random mod 10 0 drop; }
	}`)
	l.start(t, false)
	l.waitUp(t)
	before := l.a.count("new session") + l.b.count("new session")
	start := time.Now()
	sent, got := transfer(t, l.ns.a, l.ns.b, e2eTunnelB, 2<<20, nil, 0)
	if sent != got {
		t.Fatalf("transfer over a lossy carrier: sent %x, received %x", sent, got)
	}
	took := time.Since(start)
	time.Sleep(max(0, 10*time.Second-took)) // keep the lossy link up for 10 s at least
	rekeys := l.a.count("new session") + l.b.count("new session") - before
	if rekeys < 4 { // each exchange shows on both ends: at least 2 rekeys in 10 s with tokey=2
		t.Fatalf("%d session lines in 10 s over the lossy carrier (tokey=2)", rekeys)
	}
	if got := ping(t, l.ns.a, e2eTunnelB, 20, "0.05"); got < 10 {
		t.Errorf("%d of 20 pings over the lossy link after the rekeys", got)
	}
	if strings.Contains(l.a.log.String(), "link down") || strings.Contains(l.b.log.String(), "link down") {
		t.Errorf("the link went down over a lossy carrier:\n%s\n%s", l.a.log.String(), l.b.log.String())
	}
	t.Logf("2 MB intact over 10%% loss each way in %v; %d session lines (both ends) in 10 s",
		took.Round(100*time.Millisecond), rekeys)
}

// TestE2EKillAndRestart: one end is killed with SIGKILL during traffic and started
// again. The survivor (ping=1 toping=3) runs ip-down when it stops hearing from it, and
// ip-up when it is back, which takes one round trip after the restart, not tokxc.
func TestE2EKillAndRestart(t *testing.T) {
	requireRoot(t)
	l := &e2eLink{dir: t.TempDir()}
	l.extraA = append(scriptRecorder(t, l.dir), "ping=1", "toping=3", "tokxc=30")
	l.extraB = []string{"tokxc=30"}
	l.start(t, false)
	l.waitUp(t)
	pings := make(chan int, 1)
	go func() { pings <- ping(t, l.ns.a, e2eTunnelB, 50, "0.05") }()
	time.Sleep(time.Second)
	args := l.b.cmd.Args[5:]
	if err := l.b.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	<-l.b.done
	<-pings
	l.a.waitLog(t, "link down: no word from the peer", linkBound)
	restart := time.Now()
	l.b = startDaemon(t, "ciped B again", l.ns.b, args...)
	l.b.waitLog(t, "link up", linkBound)
	l.a.waitLog(t, "(?s)link down.*link up", linkBound)
	back := time.Since(restart)
	if got := ping(t, l.ns.a, e2eTunnelB, 3, "0.2"); got != 3 {
		t.Errorf("after the restart: %d of 3 pings", got)
	}
	calls := readLines(t, filepath.Join(l.dir, "calls"))
	if len(calls) != 3 || !strings.HasPrefix(calls[0], "ip-up ") || !strings.HasPrefix(calls[1], "ip-down ") ||
		!strings.Contains(calls[1], "reason=no word from the peer") || !strings.HasPrefix(calls[2], "ip-up ") {
		t.Fatalf("the survivor's scripts:\n%s", strings.Join(calls, "\n"))
	}
	if back > 15*time.Second { // tokxc is 30 s: coming back must not wait for a retry
		t.Fatalf("link back %v after the restart", back)
	}
	t.Logf("link back %v after the restart (tokxc=30)", back.Round(time.Millisecond))
}

// TestE2ENATRebinding: mid-transfer, a's source port changes (a stateless nft rewrite of
// 6000 to 7000 in a's namespace, as a NAT rebinding would do). b follows the new address
// as soon as an authentic packet arrives from it, logs it, and the transfer goes on.
func TestE2ENATRebinding(t *testing.T) {
	requireRoot(t)
	requireNft(t)
	l := &e2eLink{}
	l.start(t, false)
	l.waitUp(t)
	done := make(chan [2][32]byte, 1)
	go func() {
		s, g := transfer(t, l.ns.a, l.ns.b, e2eTunnelB, 20<<20, nil, 20*time.Millisecond)
		done <- [2][32]byte{s, g}
	}()
	time.Sleep(time.Second)
	nft(t, l.ns.a, `table ip rebind {
		chain out { type filter hook output priority raw; udp sport 6000 udp sport set 7000; }
		chain in { type filter hook prerouting priority raw; udp dport 7000 udp dport set 6000; }
	}`)
	l.b.waitLog(t, "peer moved from 198.18.0.1:6000 to 198.18.0.1:7000", linkBound)
	r := <-done
	if r[0] != r[1] {
		t.Fatalf("transfer across the rebinding: sent %x, received %x", r[0], r[1])
	}
	if got := ping(t, l.ns.b, e2eTunnelA, 3, "0.2"); got != 3 {
		t.Errorf("b to a after the rebinding: %d of 3 pings", got)
	}
}

// TestE2EReplayFromElsewhere: data and key-exchange packets captured on the carrier are
// sent again from an outsider's address: nothing is delivered twice, the peer address
// does not move, the link goes on.
func TestE2EReplayFromElsewhere(t *testing.T) {
	requireRoot(t)
	l := &e2eLink{}
	l.start(t, false)
	outsider := thirdNamespace(t, l)
	stop := make(chan struct{})
	frames := capture(t, l.ns.b, "ve1", stop)
	l.waitUp(t)
	if got := ping(t, l.ns.a, e2eTunnelB, 20, "0.05"); got != 20 {
		t.Fatalf("%d of 20 pings", got)
	}
	close(stop)
	var recorded [][]byte
	for _, p := range udpPackets(<-frames) {
		if p.src.Addr() == l.ns.carrierA {
			recorded = append(recorded, p.payload)
		}
	}
	if len(recorded) < 20 {
		t.Fatalf("recorded only %d datagrams from a", len(recorded))
	}
	c := udpFrom(t, outsider)
	to := &net.UDPAddr{IP: net.IP(l.ns.carrierB.AsSlice()), Port: 6000}
	for round := 0; round < 3; round++ {
		for _, d := range recorded {
			if _, err := c.WriteToUDP(d, to); err != nil {
				t.Fatal(err)
			}
		}
	}
	time.Sleep(time.Second)
	if got := ping(t, l.ns.a, e2eTunnelB, 5, "0.1"); got != 5 {
		t.Errorf("after the replays: %d of 5 pings", got)
	}
	if strings.Contains(l.b.log.String(), "peer moved") {
		t.Fatalf("replayed packets moved the peer:\n%s", l.b.log.String())
	}
	l.b.terminate(t)
	if n := finalCount(t, l.b, "replayed"); n < len(recorded) {
		t.Errorf("%d replays counted, %d datagrams replayed 3 times", n, len(recorded))
	}
}

// TestE2EHandshakeFlood: an outsider sends forged key-exchange initiations as fast as it
// can for 10 s. The link keeps carrying a TCP transfer and pings, b's memory stays
// bounded, and its log stays short.
func TestE2EHandshakeFlood(t *testing.T) {
	requireRoot(t)
	l := &e2eLink{}
	l.start(t, false)
	outsider := thirdNamespace(t, l)
	l.waitUp(t)
	c := udpFrom(t, outsider)
	to := &net.UDPAddr{IP: net.IP(l.ns.carrierB.AsSlice()), Port: 6000}
	stop := make(chan struct{})
	flooded := make(chan int, 1)
	start := time.Now()
	go func() {
		forged := make([]byte, initiationPartSize)
		n := 0
		for {
			select {
			case <-stop:
				flooded <- n
				return
			default:
			}
			rand.Read(forged)
			forged[offsetVersion], forged[offsetType], forged[offsetPart] = protocolVersion, messageInitiation, byte(n%exchangeParts)
			if _, err := c.WriteToUDP(forged, to); err == nil {
				n++
			}
		}
	}()
	pings := make(chan int, 1)
	// 50 pings take 10 s; the transfer about 5 s.
	go func() { pings <- ping(t, l.ns.a, e2eTunnelB, 50, "0.2") }()
	sent, got := transfer(t, l.ns.a, l.ns.b, e2eTunnelB, 20<<20, nil, 60*time.Millisecond)
	if sent != got {
		t.Fatalf("transfer during the flood: sent %x, received %x", sent, got)
	}
	answered := <-pings
	time.Sleep(10*time.Second - time.Since(start)) // the flood lasts 10 s at least
	close(stop)
	n := <-flooded
	took := time.Since(start)
	if answered < 45 {
		t.Errorf("%d of 50 pings answered during the flood", answered)
	}
	status, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", l.b.pid()))
	hwm := regexp.MustCompile(`VmHWM:\s+(\d+) kB`).FindSubmatch(status)
	if hwm == nil {
		t.Fatal("no VmHWM")
	}
	if kb, _ := strconv.Atoi(string(hwm[1])); kb > 64<<10 && !raceEnabled {
		t.Errorf("b's peak memory is %d kB after the flood", kb)
	}
	lines := bytes.Count([]byte(l.b.log.String()), []byte("\n"))
	if lines > 40 {
		t.Errorf("b logged %d lines during the flood:\n%s", lines, l.b.log.String())
	}
	l.b.terminate(t)
	t.Logf("%d forged initiations in a flood of %.1f s; %d of 50 pings answered; b: %s kB peak, %d log lines, %d refused",
		n, took.Seconds(), answered, hwm[1], lines, finalCount(t, l.b, "key-exchange refused"))
}

// TestE2EDynamicPeer: b knows neither a's carrier address (peer=0.0.0.0:0) nor its
// tunnel address (ptpaddr=0.0.0.0); it learns both from a's key exchange, configures
// the interface and passes them to ip-up.
func TestE2EDynamicPeer(t *testing.T) {
	requireRoot(t)
	dir := t.TempDir()
	ns := newNetnsPair(t, false)
	a := startDaemon(t, "ciped A", ns.a, "-o", keyFile(t, dir, "oa", testKey), "me=198.18.0.1:6000",
		"peer=198.18.0.2:6000", "ipaddr="+e2eTunnelA, "ptpaddr="+e2eTunnelB)
	b := startDaemon(t, "ciped B", ns.b, append([]string{"-o", keyFile(t, dir, "ob", testKey), "me=198.18.0.2:6000",
		"peer=0.0.0.0:0", "ipaddr=" + e2eTunnelB, "ptpaddr=0.0.0.0", "debug"}, scriptRecorder(t, dir)...)...)
	started := time.Now()
	a.waitLog(t, "link up", linkBound)
	if took := time.Since(started); took > 6*time.Second {
		t.Errorf("link up after %v: an initiation that met a closed port waits 1 s, not tokxc (10 s)", took)
	}
	b.waitLog(t, "learned the peer's tunnel address "+e2eTunnelA, linkBound)
	b.waitLog(t, "link up: peer 198.18.0.1:6000", linkBound)
	if routes := mustRun(t, "ip", "-n", ns.b, "addr", "show", "dev", "cipcb0"); !strings.Contains(routes, "peer "+e2eTunnelA) {
		t.Errorf("b's interface does not name the learned peer:\n%s", routes)
	}
	for _, c := range []struct{ ns, to string }{{ns.a, e2eTunnelB}, {ns.b, e2eTunnelA}} {
		if got := ping(t, c.ns, c.to, 3, "0.2"); got != 3 {
			t.Errorf("ping %s: %d of 3", c.to, got)
		}
	}
	waitFor(t, "ip-up", linkBound, func() bool { _, err := os.Stat(filepath.Join(dir, "calls")); return err == nil })
	if calls := readLines(t, filepath.Join(dir, "calls")); !strings.Contains(calls[0], " "+e2eTunnelB+" "+e2eTunnelA+" site-b peer=198.18.0.1:6000") {
		t.Errorf("b's ip-up: %q", calls[0])
	}
}

// TestE2EGracefulShutdown: SIGTERM on one end takes the other end's link down at once
// (its ip-down runs), not after toping or the keys' expiry.
func TestE2EGracefulShutdown(t *testing.T) {
	requireRoot(t)
	l := &e2eLink{dir: t.TempDir()}
	l.extraB = append(scriptRecorder(t, l.dir), "ping=30", "toping=60")
	l.start(t, false)
	l.waitUp(t)
	waitFor(t, "b's ip-up", linkBound, func() bool { _, err := os.Stat(filepath.Join(l.dir, "calls")); return err == nil })
	stopped := time.Now()
	if status := l.a.terminate(t); status != 0 {
		t.Fatalf("exit status %d", status)
	}
	waitFor(t, "b's ip-down", 10*time.Second, func() bool { return len(readLines(t, filepath.Join(l.dir, "calls"))) == 2 })
	took := time.Since(stopped)
	if calls := readLines(t, filepath.Join(l.dir, "calls")); !strings.Contains(calls[1], "reason=the peer shut down") {
		t.Fatalf("b's ip-down: %q", calls[1])
	}
	t.Logf("b's ip-down ran %v after SIGTERM to a (toping=60)", took.Round(time.Millisecond))
}
