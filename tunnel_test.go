package main

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/tun/tuntest"
)

// testLog sends a tunnel's log lines to the test's log.
type testLog struct {
	t    testing.TB
	name string
}

func (w testLog) Write(p []byte) (int, error) {
	w.t.Logf("%s %s", w.name, bytes.TrimRight(p, "\n"))
	return len(p), nil
}

// testEnd is one side of an in-process link: a tunnel over a fake TUN and a loopback
// UDP socket.
type testEnd struct {
	t    *linkLife
	tun  *tuntest.ChannelTUN
	cfg  *config
	addr netip.AddrPort
}

// send hands an inner packet to the tunnel as if the kernel had routed it there.
func (e *testEnd) send(tb testing.TB, pkt []byte) {
	tb.Helper()
	select {
	case e.tun.Outbound <- pkt:
	case <-time.After(10 * time.Second):
		tb.Fatal("the tunnel did not read from its interface")
	}
}

// receive waits for the next inner packet the tunnel delivers.
func (e *testEnd) receive(tb testing.TB) []byte {
	tb.Helper()
	select {
	case p := <-e.tun.Inbound:
		return p
	case <-time.After(10 * time.Second):
		tb.Fatal("no packet arrived")
		return nil
	}
}

func testConfig(ipaddr, ptpaddr string) *config {
	key := [linkKeySize]byte{1, 2, 3}
	return &config{key: &key, ipaddr: netip.MustParseAddr(ipaddr), ptpaddr: netip.MustParseAddr(ptpaddr),
		mtu: 1420, metric: -1, tokxc: time.Second, tokey: time.Minute, ciphers: knownCiphers,
		me: netip.MustParseAddrPort("127.0.0.1:0")}
}

// newTestPair starts two connected tunnels; adjust may change either config first, and
// wrapA may wrap a's carrier. Both are closed when the test ends.
func newTestPair(tb testing.TB, adjust func(a, b *config), wrapA ...func(carrier) carrier) (a, b *testEnd) {
	tb.Helper()
	ca, cb := testConfig("10.0.0.1", "10.0.0.2"), testConfig("10.0.0.2", "10.0.0.1")
	ends := []*testEnd{{cfg: ca}, {cfg: cb}}
	conns := make([]*udpCarrier, 2)
	for i, e := range ends {
		c, _, err := listenCarrier(e.cfg.me, carrierOptions{batch: carrierBatch, gso: true, gro: true})
		if err != nil {
			tb.Fatal(err)
		}
		conns[i], e.addr = c, c.LocalAddr()
	}
	ca.peer, cb.peer = ends[1].addr, ends[0].addr
	if adjust != nil {
		adjust(ca, cb)
	}
	for i, e := range ends {
		e.tun = tuntest.NewChannelTUN()
		name := string(rune('A' + i))
		var w io.Writer = io.Discard
		if testing.Verbose() {
			w = testLog{tb, name}
		}
		var conn carrier = conns[i]
		if i == 0 && len(wrapA) > 0 {
			conn = wrapA[0](conn)
		}
		dev := e.tun.TUN()
		e.t = newLink(e.cfg, newLogger(w, "tun"+name, true), dev, &plainPort{dev: dev, mtu: e.cfg.mtu}, conn, "tun"+name, 0)
	}
	for _, e := range ends {
		e.t.data.parallelCrypto = true // whatever the machine, exercise the two-core path too
		e.t.start()
		tb.Cleanup(e.t.close)
	}
	return ends[0], ends[1]
}

// waitFor polls cond until it holds or the (generous) bound passes.
func waitFor(tb testing.TB, what string, bound time.Duration, cond func() bool) {
	tb.Helper()
	deadline := time.Now().Add(bound)
	for !cond() {
		if time.Now().After(deadline) {
			tb.Fatalf("timed out after %v waiting for %s", bound, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func waitUp(tb testing.TB, ends ...*testEnd) {
	tb.Helper()
	waitFor(tb, "link up", 20*time.Second, func() bool {
		for _, e := range ends {
			if !e.t.up.Load() {
				return false
			}
		}
		return true
	})
}

// numberedPing is an ICMPv4 echo request from src to dst carrying n, so that a received
// packet can be told apart from every other one.
func numberedPing(src, dst string, n uint32) []byte {
	p := tuntest.Ping(netip.MustParseAddr(dst), netip.MustParseAddr(src))
	binary.BigEndian.PutUint32(p[24:], n) // identifier and sequence number
	return p
}

func pingNumber(p []byte) uint32 { return binary.BigEndian.Uint32(p[24:]) }

func TestTunnelInProcess(t *testing.T) {
	before := runtime.NumGoroutine()
	func() {
		a, b := newTestPair(t, nil)
		waitUp(t, a, b)
		for i := uint32(0); i < 50; i++ {
			a.send(t, numberedPing("10.0.0.1", "10.0.0.2", i))
			if got := b.receive(t); pingNumber(got) != i || !bytes.Equal(got, numberedPing("10.0.0.1", "10.0.0.2", i)) {
				t.Fatalf("b received %x, want ping %d", got, i)
			}
			b.send(t, numberedPing("10.0.0.2", "10.0.0.1", i))
			if got := a.receive(t); pingNumber(got) != i {
				t.Fatalf("a received ping %d, want %d", pingNumber(got), i)
			}
		}
		// A sender counts a packet when its send has returned, which may be after the
		// receiver delivered it.
		waitFor(t, "the counters to reach 50", 10*time.Second, func() bool {
			return a.t.stats.rxPackets.Load() >= 50 && b.t.stats.txPackets.Load() >= 50
		})
		if a.t.stats.rxPackets.Load() != 50 || b.t.stats.txPackets.Load() != 50 {
			t.Errorf("counters: a received %d, b sent %d", a.t.stats.rxPackets.Load(), b.t.stats.txPackets.Load())
		}
		a.t.close()
		b.t.close()
	}()
	// Every goroutine of both tunnels ends with close.
	waitFor(t, "the tunnels' goroutines to end", 10*time.Second, func() bool { return runtime.NumGoroutine() <= before })
}

func TestTunnelCipherNegotiation(t *testing.T) {
	a, b := newTestPair(t, func(a, b *config) { b.ciphers = cipherChaCha20Poly1305 })
	waitUp(t, a, b)
	for _, e := range []*testEnd{a, b} {
		if s := e.t.keys.current.Load(); s == nil || s.suite != cipherChaCha20Poly1305 {
			t.Errorf("session %+v, want ChaCha20-Poly1305 (one side does not offer AES)", s)
		}
	}
}

// TestTunnelRekeyUnderTraffic rekeys every 100 ms (and by packet count) while packets
// flow both ways, under the race detector in CI, and checks that none is lost or
// duplicated.
func TestTunnelRekeyUnderTraffic(t *testing.T) {
	a, b := newTestPair(t, func(a, b *config) {
		a.tokey, b.tokey = 100*time.Millisecond, 100*time.Millisecond
		a.tokxc, b.tokxc = 100*time.Millisecond, 100*time.Millisecond
	})
	b.t.rekeyAfter = 300 // also rekey by count
	waitUp(t, a, b)
	start := a.t.stats.exchanges.Load() + b.t.stats.exchanges.Load()
	const n = 3000
	var wg sync.WaitGroup
	for _, dir := range []struct {
		from, to *testEnd
		src, dst string
	}{{a, b, "10.0.0.1", "10.0.0.2"}, {b, a, "10.0.0.2", "10.0.0.1"}} {
		wg.Add(2)
		go func() {
			defer wg.Done()
			for i := uint32(0); i < n; i++ {
				dir.from.tun.Outbound <- numberedPing(dir.src, dir.dst, i)
				if i%10 == 0 {
					time.Sleep(time.Millisecond) // spread the traffic over many rekeys
				}
			}
		}()
		go func() {
			defer wg.Done()
			seen := make([]bool, n)
			for got := 0; got < n; got++ {
				select {
				case p := <-dir.to.tun.Inbound:
					i := pingNumber(p)
					if i >= n || seen[i] {
						t.Errorf("%s: packet %d delivered twice or unknown", dir.dst, i)
						return
					}
					seen[i] = true
				case <-time.After(20 * time.Second):
					t.Errorf("%s: only %d of %d packets arrived", dir.dst, got, n)
					return
				}
			}
		}()
	}
	wg.Wait()
	rekeys := a.t.stats.exchanges.Load() + b.t.stats.exchanges.Load() - start
	if rekeys < 10 {
		t.Errorf("only %d key exchanges during the transfer, want many", rekeys)
	}
	for _, e := range []*testEnd{a, b} {
		s := &e.t.stats
		if s.dropNoSession.Load()+s.dropAuth.Load()+s.dropReplay.Load()+s.dropUnknown.Load() != 0 {
			t.Errorf("drops: %s", s.summary())
		}
	}
	t.Logf("%d key exchanges while %d packets went each way", rekeys, n)
}

// TestTunnelWrongKey: different keys never bring the link up.
func TestTunnelWrongKey(t *testing.T) {
	a, b := newTestPair(t, func(a, b *config) {
		other := [linkKeySize]byte{9}
		b.key = &other
		a.tokxc, b.tokxc = 50*time.Millisecond, 50*time.Millisecond
	})
	waitFor(t, "several refused exchanges", 20*time.Second, func() bool {
		return a.t.stats.dropExchange.Load() >= 5 && b.t.stats.dropExchange.Load() >= 5
	})
	if a.t.up.Load() || b.t.up.Load() || a.t.keys.current.Load() != nil || b.t.keys.current.Load() != nil {
		t.Fatal("a link with two different keys came up")
	}
}

// rawSender is a UDP socket for injecting datagrams at a tunnel's carrier port.
func rawSender(tb testing.TB) *net.UDPConn {
	c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { c.Close() })
	return c
}

// recordingCarrier keeps a copy of every datagram sent through it.
type recordingCarrier struct {
	carrier
	mu   sync.Mutex
	sent [][]byte
}

func (r *recordingCarrier) WriteBatch(msgs []carrierMsg, to netip.AddrPort) error {
	r.mu.Lock()
	for _, m := range msgs {
		r.sent = append(r.sent, bytes.Clone(m.buf))
	}
	r.mu.Unlock()
	return r.carrier.WriteBatch(msgs, to)
}

// TestTunnelReplayAndGarbage replays recorded traffic from another address and throws
// garbage at the port: nothing is delivered twice, the peer does not move, and the link
// keeps working.
func TestTunnelReplayAndGarbage(t *testing.T) {
	var rec *recordingCarrier
	a, b := newTestPair(t, nil, func(c carrier) carrier {
		rec = &recordingCarrier{carrier: c} // records what a sends
		return rec
	})
	waitUp(t, a, b)
	for i := uint32(0); i < 20; i++ {
		a.send(t, numberedPing("10.0.0.1", "10.0.0.2", i))
		b.receive(t)
	}
	rec.mu.Lock()
	recorded := append([][]byte(nil), rec.sent...)
	rec.mu.Unlock()
	if len(recorded) < 20 {
		t.Fatalf("recorded only %d datagrams", len(recorded))
	}
	peerBefore := *b.t.peer.Load()
	attacker := rawSender(t)
	to := net.UDPAddrFromAddrPort(b.addr)
	for _, d := range recorded {
		if _, err := attacker.WriteToUDP(d, to); err != nil {
			t.Fatal(err)
		}
	}
	garbage := [][]byte{{}, {1}, {1, 3}, {1, 3, 0, 0, 1, 2, 3, 4}, bytes.Repeat([]byte{0xff}, 1500),
		{0x45, 0, 0, 20}, append([]byte{1, 1}, make([]byte, 114)...), append([]byte{1, 2}, make([]byte, 110)...)}
	for _, d := range recorded {
		if len(d) > dataHeaderSize {
			truncated := bytes.Clone(d[:len(d)-1])
			flipped := bytes.Clone(d)
			flipped[len(d)-1] ^= 1
			garbage = append(garbage, truncated, flipped)
		}
	}
	for _, d := range garbage {
		if _, err := attacker.WriteToUDP(d, to); err != nil {
			t.Fatal(err)
		}
	}
	stats := &b.t.stats
	waitFor(t, "the replays and garbage to be counted", 10*time.Second, func() bool {
		return stats.dropReplay.Load() >= 20 && stats.dropAuth.Load() >= 10 && stats.dropMalformed.Load() >= 4
	})
	select {
	case p := <-b.tun.Inbound:
		t.Fatalf("a replayed or forged packet was delivered: %x", p)
	case <-time.After(200 * time.Millisecond):
	}
	if got := *b.t.peer.Load(); got != peerBefore {
		t.Fatalf("replayed packets moved the peer from %s to %s", peerBefore, got)
	}
	// Still working both ways.
	a.send(t, numberedPing("10.0.0.1", "10.0.0.2", 1000))
	if got := b.receive(t); pingNumber(got) != 1000 {
		t.Fatalf("after the attack b received %d", pingNumber(got))
	}
	b.send(t, numberedPing("10.0.0.2", "10.0.0.1", 1001))
	if got := a.receive(t); pingNumber(got) != 1001 {
		t.Fatalf("after the attack a received %d", pingNumber(got))
	}
}

func TestTunnelNokey(t *testing.T) {
	a, b := newTestPair(t, func(a, b *config) {
		a.key, b.key = nil, nil
		b.peer = netip.AddrPort{} // b learns a's address from its first packet
	})
	waitFor(t, "a's link up", 10*time.Second, a.t.up.Load)
	a.send(t, numberedPing("10.0.0.1", "10.0.0.2", 7))
	if got := b.receive(t); !bytes.Equal(got, numberedPing("10.0.0.1", "10.0.0.2", 7)) {
		t.Fatalf("b received %x", got)
	}
	waitFor(t, "b to learn its peer", 10*time.Second, b.t.up.Load)
	b.send(t, numberedPing("10.0.0.2", "10.0.0.1", 8))
	if got := a.receive(t); pingNumber(got) != 8 {
		t.Fatalf("a received %x", got)
	}
	// A keyed peer's message is not an IP packet: dropped, not delivered.
	if _, err := rawSender(t).WriteToUDP(dataVectorBytes(t), net.UDPAddrFromAddrPort(b.addr)); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the drop", 10*time.Second, func() bool { return b.t.stats.dropMalformed.Load() == 1 })
}

func dataVectorBytes(t testing.TB) []byte { return unhex(t, dataVectors[0].wantHex) }

// TestTunnelDynamicPeer: with peer=0.0.0.0:0 and no ptpaddr, b waits for a, learns its
// carrier and tunnel addresses, and the link works both ways.
func TestTunnelDynamicPeer(t *testing.T) {
	a, b := newTestPair(t, func(a, b *config) {
		b.peer = netip.AddrPort{}
		b.ptpaddr = netip.Addr{}
	})
	waitUp(t, a, b)
	if got := *b.t.peer.Load(); got != a.addr {
		t.Errorf("b learned peer %s, want %s", got, a.addr)
	}
	if b.t.state.args[4] != "10.0.0.1" {
		t.Errorf("b's scripts get ptpaddr %q, want the learned 10.0.0.1", b.t.state.args[4])
	}
	b.send(t, numberedPing("10.0.0.2", "10.0.0.1", 3))
	if got := a.receive(t); pingNumber(got) != 3 {
		t.Fatalf("a received %x", got)
	}
}

// TestTunnelScripts: ip-up runs with CIPE's arguments when the link comes up, ip-down
// with the same ones when it goes down, in that order, never blocking the tunnel.
func TestTunnelScripts(t *testing.T) {
	dir := t.TempDir()
	script := func(name string) string {
		path := filepath.Join(dir, name)
		body := fmt.Sprintf("#!/bin/sh\nsleep 0.2\necho \"%s $* peer=$CIPED_PEER cipher=$CIPED_CIPHER reason=$CIPED_REASON\" >> %s/calls\necho output of %s\n",
			name, dir, name)
		if err := os.WriteFile(path, []byte(body), 0o755); err != nil {
			t.Fatal(err)
		}
		return path
	}
	up, down := script("ip-up"), script("ip-down")
	a, b := newTestPair(t, func(a, b *config) {
		a.ipup, a.ipdown, a.arg = up, down, "extra"
	})
	waitUp(t, a, b)
	b.t.close() // says goodbye: a's link goes down at once
	waitFor(t, "a's link to go down", 10*time.Second, func() bool { return !a.t.up.Load() })
	a.t.close()
	calls, err := os.ReadFile(filepath.Join(dir, "calls"))
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(string(calls)), "\n")
	args := fmt.Sprintf("tunA %s %d 10.0.0.1 10.0.0.2 extra peer=%s", a.addr, os.Getpid(), b.addr)
	want := []string{
		"ip-up " + args + " cipher=AES-256-GCM reason=",
		"ip-down " + args + " cipher=AES-256-GCM reason=the peer shut down",
	}
	if !hasAESHardware() {
		want = []string{strings.ReplaceAll(want[0], "AES-256-GCM", "ChaCha20-Poly1305"), strings.ReplaceAll(want[1], "AES-256-GCM", "ChaCha20-Poly1305")}
	}
	if len(lines) != 2 || lines[0] != want[0] || lines[1] != want[1] {
		t.Fatalf("script calls:\n%s\nwant:\n%s", strings.Join(lines, "\n"), strings.Join(want, "\n"))
	}
}

// crash stops a tunnel as kill -9 would: no goodbye reaches the peer, and its port is
// closed, so that what the peer sends there comes back as ICMP port unreachable.
func (e *testEnd) crash() {
	e.t.conn.Close()
	e.t.close()
}

// TestTunnelPing: with ping and toping on one side only, an idle link stays up because
// the other side answers the pings; when that side dies silently, toping takes the link
// down and ip-down runs.
func TestTunnelPing(t *testing.T) {
	a, b := newTestPair(t, func(a, b *config) {
		a.ping, a.toping = 200*time.Millisecond, time.Second
		a.maxerr = -1 // only toping may decide here
	})
	waitUp(t, a, b)
	time.Sleep(3 * time.Second) // idle: only the keepalives pass
	if !a.t.up.Load() {
		t.Fatal("an idle link whose peer answers pings went down")
	}
	b.crash()
	waitFor(t, "toping to take the link down", 20*time.Second, func() bool { return !a.t.up.Load() })
	if a.t.keys.current.Load() != nil {
		t.Error("the dead peer's session was kept")
	}
}

// TestTunnelMaxerr: ICMP errors for datagrams to a peer that is gone take the link down
// after maxerr of them, without ping or toping.
func TestTunnelMaxerr(t *testing.T) {
	a, b := newTestPair(t, func(a, b *config) { a.maxerr = 3 })
	waitUp(t, a, b)
	b.crash()
	for i := uint32(0); a.t.up.Load() && i < 1000; i++ {
		a.send(t, numberedPing("10.0.0.1", "10.0.0.2", i))
		time.Sleep(10 * time.Millisecond)
	}
	if a.t.up.Load() {
		t.Fatalf("still up after 1000 packets into a closed port; %s", a.t.stats.summary())
	}
	if got := a.t.stats.carrierErrors.Load(); got < 4 {
		t.Errorf("link down after %d carrier errors, want more than maxerr=3", got)
	}
}

// restart starts a fresh tunnel (no state) on the same port and configuration as e, as a
// process restarted after a crash would be.
func (e *testEnd) restart(tb testing.TB) {
	tb.Helper()
	conn, _, err := listenCarrier(e.addr, carrierOptions{batch: carrierBatch, gso: true, gro: true})
	if err != nil {
		tb.Fatal(err)
	}
	e.tun = tuntest.NewChannelTUN()
	var w io.Writer = io.Discard
	if testing.Verbose() {
		w = testLog{tb, "restarted"}
	}
	dev := e.tun.TUN()
	e.t = newLink(e.cfg, newLogger(w, "tunR", true), dev, &plainPort{dev: dev, mtu: e.cfg.mtu}, conn, "tunR", 0)
	e.t.start()
	tb.Cleanup(e.t.close)
}

// TestTunnelDynamicPeerRestart: the end with peer=0.0.0.0:0 crashes and comes back with
// no state. It cannot initiate on its own (it does not know the peer), but the first
// packet the other end sends under the old session makes it start an exchange, and the
// link is back without waiting for the other end's keys to expire.
func TestTunnelDynamicPeerRestart(t *testing.T) {
	a, b := newTestPair(t, func(a, b *config) {
		b.peer = netip.AddrPort{}
		a.tokey, a.tokxc = time.Hour, time.Hour // nothing on a's side would help
	})
	waitUp(t, a, b)
	b.crash()
	b.restart(t)
	a.send(t, numberedPing("10.0.0.1", "10.0.0.2", 1)) // lost: b has no session yet
	waitFor(t, "the restarted end's link up", 20*time.Second, b.t.up.Load)
	// a may still send under the old session until it sees the new one confirmed.
	deadline := time.Now().Add(20 * time.Second)
	for n := uint32(2); ; n++ {
		if time.Now().After(deadline) {
			t.Fatal("no ping got through after the restart")
		}
		a.send(t, numberedPing("10.0.0.1", "10.0.0.2", n))
		select {
		case p := <-b.tun.Inbound:
			if pingNumber(p) >= 2 {
				return
			}
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// TestTunnelWallClockJump: the wall clock of one end jumps an hour back, the other's an
// hour forward, and later back again. Timers run on the monotonic clock and the
// key-exchange timestamps only ever increase, so rekeying and traffic go on.
func TestTunnelWallClockJump(t *testing.T) {
	a, b := newTestPair(t, func(a, b *config) {
		a.tokey, b.tokey = 100*time.Millisecond, 100*time.Millisecond
		a.tokxc, b.tokxc = 100*time.Millisecond, 100*time.Millisecond
	})
	waitUp(t, a, b)
	refused := a.t.stats.dropExchange.Load() + b.t.stats.dropExchange.Load() // a collision's copy, at the start
	for _, skew := range []struct{ a, b time.Duration }{{-time.Hour, time.Hour}, {0, 0}} {
		a.t.wallSkew.Store(int64(skew.a))
		b.t.wallSkew.Store(int64(skew.b))
		start := a.t.stats.exchanges.Load() + b.t.stats.exchanges.Load()
		waitFor(t, "rekeys after the jump", 20*time.Second, func() bool {
			return a.t.stats.exchanges.Load()+b.t.stats.exchanges.Load() >= start+6
		})
		for i := uint32(0); i < 5; i++ {
			a.send(t, numberedPing("10.0.0.1", "10.0.0.2", i))
			if got := b.receive(t); pingNumber(got) != i {
				t.Fatalf("after the jump b received ping %d, want %d", pingNumber(got), i)
			}
		}
	}
	if n := a.t.stats.dropExchange.Load() + b.t.stats.dropExchange.Load() - refused; n != 0 {
		t.Errorf("%d key-exchange messages refused across the jumps", n)
	}
}

// scriptedCarrier answers readNow from a script, one entry per call: a datagram from
// `from`, or nil for nothing ready (also when the script has run out); err, if set, is
// returned instead by the next call.
type scriptedCarrier struct {
	sinkCarrier
	script [][]byte
	from   netip.AddrPort
	err    error
	reads  int
}

func (c *scriptedCarrier) setReceiveLock(*sync.Mutex) {}
func (c *scriptedCarrier) readNow(msgs []carrierMsg) (int, error) {
	c.reads++
	if err := c.err; err != nil {
		c.err = nil
		return 0, err
	}
	if len(c.script) == 0 {
		return 0, nil
	}
	d := c.script[0]
	c.script = c.script[1:]
	if d == nil {
		return 0, nil
	}
	msgs[0].n, msgs[0].from, msgs[0].segSize = copy(msgs[0].buf, d), c.from, 0
	return 1, nil
}

// recordingPort is an interface that keeps what is written to it (or, with discard, only
// counts it) and has nothing to read.
type recordingPort struct {
	written [][]byte
	discard bool
	count   int
}

func (p *recordingPort) newFrameBatch() *frameBatch                  { return newFrameBatch(4, 2048) }
func (p *recordingPort) read(fb *frameBatch, lock *sync.Mutex) error { select {} }
func (p *recordingPort) readNow(fb *frameBatch) error {
	fb.frames = fb.frames[:0]
	return nil
}
func (p *recordingPort) inject([]byte) error { return nil }
func (p *recordingPort) readsNow() bool      { return false }
func (p *recordingPort) write(pkts []innerPacket) error {
	p.count += len(pkts)
	if p.discard {
		return nil
	}
	for _, k := range pkts {
		p.written = append(p.written, bytes.Clone(k.pkt))
	}
	return nil
}

// TestAnswerWatch: after a small send the outbound loop polls the carrier; an answer that
// comes within answerWatch is delivered to the interface by it; a watch that sees nothing
// gives up after answerWatch and pauses the watching, for twice as long each time up to
// answerPauseMax, until an answer comes; a busy inbound loop, or a link on which
// something came in within answerQuiet, gets no watch; a carrier error is counted, but
// not the closed socket of a tunnel that stops.
func TestAnswerWatch(t *testing.T) {
	cfg := testConfig("10.0.0.1", "10.0.0.2")
	cfg.key = nil
	cfg.peer = netip.MustParseAddrPort("127.0.0.1:9")
	port := &recordingPort{}
	conn := &scriptedCarrier{from: cfg.peer}
	tn := newLink(cfg, newLogger(testLog{t: t, name: "watch"}, "watch", true), nil, port, conn, "watch", 0).data
	tn.watch = newAnswerWatcher(tn, conn)
	w := tn.watch
	watch := func() time.Duration {
		tn.lastInbound.Store(-int64(time.Hour)) // quiet
		tn.out.mu.Lock()
		defer tn.out.mu.Unlock()
		start := time.Now()
		tn.watchForAnswer(tn.out)
		return time.Since(start)
	}

	answer := numberedPing("10.0.0.2", "10.0.0.1", 1)
	conn.script = [][]byte{nil, nil, answer}
	watch()
	if len(port.written) != 1 || !bytes.Equal(port.written[0], answer) || conn.reads != 3 {
		t.Fatalf("answer on the third poll: %d reads, wrote %x", conn.reads, port.written)
	}

	// Nothing comes: the watch lasts answerWatch, then pauses grow.
	for i, want := range []time.Duration{answerPauseMin, 2 * answerPauseMin, 4 * answerPauseMin} {
		w.pauseUntil = time.Time{}
		if took := watch(); took < answerWatch || took > 2*time.Second {
			t.Fatalf("watch %d without an answer took %v, not about %v", i, took, answerWatch)
		}
		if left := time.Until(w.pauseUntil); left <= 0 || left > want {
			t.Fatalf("watch %d: pause of %v, want at most %v", i, left, want)
		}
		if w.pause != 2*want {
			t.Fatalf("watch %d: next pause %v, want %v", i, w.pause, 2*want)
		}
	}
	reads := conn.reads
	watch()
	if conn.reads != reads {
		t.Fatalf("a paused watch read the carrier %d times", conn.reads-reads)
	}
	for range 20 {
		w.pauseUntil = time.Time{}
		watch()
	}
	if w.pause != answerPauseMax {
		t.Fatalf("pause grew to %v, want at most %v", w.pause, answerPauseMax)
	}

	// An answer ends the pauses.
	w.pauseUntil = time.Time{}
	conn.script = [][]byte{numberedPing("10.0.0.2", "10.0.0.1", 2)}
	watch()
	if len(port.written) != 2 || pingNumber(port.written[1]) != 2 || w.pause != answerPauseMin {
		t.Fatalf("second answer: wrote %d packets, pause %v", len(port.written), w.pause)
	}

	// Something came in just now: the inbound loop is awake, no watch.
	conn.script = [][]byte{numberedPing("10.0.0.2", "10.0.0.1", 3)}
	reads = conn.reads
	tn.lastInbound.Store(tn.since(time.Now()))
	tn.out.mu.Lock()
	tn.watchForAnswer(tn.out)
	tn.out.mu.Unlock()
	if conn.reads != reads || len(port.written) != 2 {
		t.Fatalf("a watch on a busy link read %d times, wrote %d packets", conn.reads-reads, len(port.written))
	}

	// The inbound loop holds the inbound state: the watch leaves the carrier to it.
	tn.inMu.Lock()
	conn.script = [][]byte{numberedPing("10.0.0.2", "10.0.0.1", 3)}
	reads = conn.reads
	watch()
	tn.inMu.Unlock()
	if conn.reads != reads || len(port.written) != 2 {
		t.Fatalf("a watch while the inbound loop works read %d times, wrote %d packets", conn.reads-reads, len(port.written))
	}

	// Catching an answer allocates nothing.
	port.discard = true
	script := make([][]byte, 1)
	script[0] = answer
	count := port.count
	if allocs := testing.AllocsPerRun(100, func() {
		conn.script = script
		watch()
	}); allocs != 0 || port.count != count+101 {
		t.Fatalf("%v allocations per caught answer; %d answers delivered of 101", allocs, port.count-count)
	}

	// A carrier error ends the watch and is counted like the inbound loop's.
	tn.up.Store(true) // while the link is down, such reports are expected and not counted
	refused := carrierReport{kind: reportUnreachable, dst: cfg.peer}
	conn.script, conn.err = nil, &unreachableError{count: 3, err: syscall.ECONNREFUSED,
		reports: []carrierReport{refused, refused, refused}}
	watch()
	if got := tn.stats.carrierErrors.Load(); got != 3 {
		t.Fatalf("carrier errors: %d, want 3", got)
	}
	// The socket closed under the tunnel (it is stopping): nothing to count.
	conn.err = fmt.Errorf("recvmmsg: %w", net.ErrClosed)
	watch()
	if got := tn.stats.carrierErrors.Load(); got != 3 {
		t.Fatalf("carrier errors after a closed socket: %d, want 3", got)
	}
}

// TestCarrierReceiveLock: with a receive lock, ReadBatch lets go of it while it waits and
// returns holding it; readNow reads what is there without waiting, and nothing when
// nothing is.
func TestCarrierReceiveLock(t *testing.T) {
	c, _, err := listenCarrier(netip.MustParseAddrPort("127.0.0.1:0"), carrierOptions{batch: carrierBatch, gro: true})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var lock sync.Mutex
	c.setReceiveLock(&lock)
	msgs := make([]carrierMsg, receiveNowBatch)
	for i := range msgs {
		msgs[i].buf = make([]byte, c.receiveBufferSize(2000))
	}
	lock.Lock()
	if n, err := c.readNow(msgs); n != 0 || err != nil {
		t.Fatalf("readNow on an empty socket: %d, %v", n, err)
	}
	lock.Unlock()

	sender := rawSender(t)
	to := net.UDPAddrFromAddrPort(c.LocalAddr())
	if _, err := sender.WriteToUDP([]byte("first"), to); err != nil {
		t.Fatal(err)
	}
	lock.Lock()
	var n int
	waitFor(t, "readNow to see the datagram", 10*time.Second, func() bool {
		n, err = c.readNow(msgs)
		return n > 0 || err != nil
	})
	lock.Unlock()
	if n != 1 || err != nil || string(msgs[0].buf[:msgs[0].n]) != "first" ||
		msgs[0].from != sender.LocalAddr().(*net.UDPAddr).AddrPort() {
		t.Fatalf("readNow: %d, %v, %q from %v", n, err, msgs[0].buf[:max(0, msgs[0].n)], msgs[0].from)
	}

	type result struct {
		n   int
		err error
	}
	done := make(chan result)
	readBatch := func() {
		started := make(chan struct{})
		go func() {
			close(started)
			n, err := c.ReadBatch(msgs)
			done <- result{n, err}
		}()
		<-started
		// While ReadBatch waits, the lock is free: it is taken for each attempt to read
		// only. (Checked over 200 ms, long enough for the reader to be waiting.)
		for i := range 20 {
			if !lock.TryLock() {
				t.Fatalf("check %d: the lock is held while ReadBatch waits", i)
			}
			lock.Unlock()
			time.Sleep(10 * time.Millisecond)
		}
	}
	wait := func() result {
		select {
		case r := <-done:
			if lock.TryLock() {
				t.Fatal("ReadBatch returned without holding the receive lock")
			}
			lock.Unlock()
			return r
		case <-time.After(10 * time.Second):
			t.Fatal("ReadBatch did not return within 10 s")
		}
		return result{}
	}

	readBatch()
	if _, err := sender.WriteToUDP([]byte("second"), to); err != nil {
		t.Fatal(err)
	}
	if r := wait(); r.n != 1 || r.err != nil || string(msgs[0].buf[:msgs[0].n]) != "second" {
		t.Fatalf("ReadBatch: %d, %v, %q", r.n, r.err, msgs[0].buf[:max(0, msgs[0].n)])
	}

	// A failed read returns holding the lock too.
	readBatch()
	c.Close()
	if r := wait(); r.n != 0 || !errors.Is(r.err, net.ErrClosed) {
		t.Fatalf("ReadBatch on a closed socket: %d, %v", r.n, r.err)
	}
}

// keptCarrier keeps a copy of every datagram sent through it.
type keptCarrier struct {
	sinkCarrier
	sent [][]byte
}

func (c *keptCarrier) WriteBatch(msgs []carrierMsg, to netip.AddrPort) error {
	for _, m := range msgs {
		c.sent = append(c.sent, bytes.Clone(m.buf))
	}
	return nil
}

// TestConfirmationRepeated: an initiator that has not heard from the peer under its new
// session asks for a keepalive under it (confirming the session for the responder) every
// tokxc/2, and stops once something came.
func TestConfirmationRepeated(t *testing.T) {
	cfg := testConfig("10.0.0.1", "10.0.0.2")
	cfg.peer = netip.MustParseAddrPort("127.0.0.1:9")
	cfg.tokxc, cfg.tokey = 2*time.Second, time.Hour
	conn := &keptCarrier{}
	tn := newLink(cfg, newLogger(testLog{t: t, name: "confirm"}, "confirm", true), nil, &recordingPort{}, conn, "confirm", 0)
	si, sr := katSessions(t, cipherAES256GCM, 0x11223344, 0x55667788, 0)
	tn.keys.rotate(si)

	start := time.Now()
	tn.askConfirmation(si, start) // as after the response
	for _, c := range []struct {
		at   time.Duration
		sent int
	}{{0, 1}, {cfg.tokxc / 4, 1}, {cfg.tokxc / 2, 2}, {cfg.tokxc, 3}} {
		tn.tick(start.Add(c.at))
		if len(conn.sent) != c.sent {
			t.Fatalf("at %v: %d keepalives sent, want %d", c.at, len(conn.sent), c.sent)
		}
	}
	var nonce [12]byte
	for i, msg := range conn.sent {
		h, err := parseDataHeader(msg)
		if err != nil {
			t.Fatal(err)
		}
		inner, err := sr.open(msg, h, &nonce)
		if err != nil || len(inner) != 0 || h.flags != flagPing {
			t.Fatalf("keepalive %d: %v, %d bytes inside, flags %#x (want a ping)", i, err, len(inner), h.flags)
		}
	}

	si.received.Store(true) // the peer answered under the session
	tn.tick(start.Add(10 * cfg.tokxc))
	if len(conn.sent) != 3 {
		t.Fatalf("%d keepalives after the peer answered, want none more", len(conn.sent)-3)
	}
}

// TestTunnelLearnedAddress: an end that learns the peer's tunnel address refuses claims
// no peer can own (unspecified, loopback, multicast, broadcast, link-local, an address
// of this host) before it answers: its link never comes up.
func TestTunnelLearnedAddress(t *testing.T) {
	for _, bad := range []string{"0.0.0.0", "127.0.0.1", "224.0.0.1", "255.255.255.255", "169.254.1.1", "127.0.0.2"} {
		t.Run(bad, func(t *testing.T) {
			a, b := newTestPair(t, func(a, b *config) {
				a.ipaddr = netip.MustParseAddr(bad)
				b.peer, b.ptpaddr = netip.AddrPort{}, netip.Addr{}
			})
			waitFor(t, "b to refuse a's initiation", 20*time.Second, func() bool { return b.t.stats.dropExchange.Load() >= 2 })
			if b.t.up.Load() || a.t.up.Load() {
				t.Fatalf("a link came up with a claim of %s", bad)
			}
		})
	}
}
