package main

// The attack suite: end to end, two ciped processes in namespaces and, where the attack
// needs one, a third, off-path attacker namespace on the carrier network. Each test
// asserts the outcome (the link stays up, nothing leaks, answers stay bounded, shutdown
// stays within its bound), never how long something took.

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestAttackDSCPBursts: bursts of same-size inner packets with a DSCP mark (EF pings sent
// 16 at a time) and bursts of the kernel's own ICMP errors (TOS 0xc0) through the tunnel,
// over IPv4 and IPv6 carriers. Such a batch once overran the room for the control
// messages of a GSO send and killed ciped. Both ends must live, the traffic must pass,
// and the carrier packets must carry the marks.
func TestAttackDSCPBursts(t *testing.T) {
	requireRoot(t)
	for _, ipv6 := range []bool{false, true} {
		t.Run(fmt.Sprintf("ipv6-carrier=%v", ipv6), func(t *testing.T) {
			l := &e2eLink{}
			l.start(t, ipv6)
			l.waitUp(t)
			stop := make(chan struct{})
			frames := capture(t, l.ns.b, "ve1", stop)

			out, _ := exec.Command("ip", "netns", "exec", l.ns.a, "ping", "-n", "-q", "-Q", "0x20", "-l", "16",
				"-s", "16", "-c", "64", "-i", "0.01", "-W", "2", e2eTunnelB).CombinedOutput()
			// A burst of datagrams to a closed port: b's kernel answers each with an ICMP
			// port unreachable of TOS 0xc0, back through the tunnel, many in one batch.
			var c *net.UDPConn
			if err := inNetns(l.ns.a, func() (err error) {
				c, err = net.DialUDP("udp", nil, &net.UDPAddr{IP: net.ParseIP(e2eTunnelB), Port: 9})
				return err
			}); err != nil {
				t.Fatal(err)
			}
			for range 200 {
				c.Write(make([]byte, 20))
			}
			c.Close()
			time.Sleep(200 * time.Millisecond) // let the errors come back before the check
			close(stop)
			captured := <-frames

			for _, d := range []*daemon{l.a, l.b} {
				if !d.running() {
					t.Fatalf("%s died (status %d)", d.name, d.status)
				}
			}
			if got := ping(t, l.ns.a, e2eTunnelB, 3, "0.2"); got != 3 {
				t.Fatalf("after the bursts %d of 3 pings came back\nthe burst's ping said:\n%s", got, out)
			}
			if !ipv6 {
				marked := 0
				for _, p := range udpPackets(captured) {
					if p.src.Addr() == l.ns.carrierA && len(p.payload) > dataOverhead && p.tos == 0x20 {
						marked++
					}
				}
				if marked < 16 {
					t.Fatalf("%d carrier packets from a carried the EF pings' DSCP 0x20, want at least 16", marked)
				}
			}
		})
	}
}

// attacker adds an off-path host on b's side of the carrier network: a namespace joined
// to b by a veth pair (IPv4 198.18.2.2, IPv6 2001:db8:c2::2) that routes to b's carrier
// address. It is removed when the test ends.
func attacker(t *testing.T, l *e2eLink) string {
	t.Helper()
	c := attachNamespace(t, l, "x", "ve4", "ve5", "198.18.2")
	mustRun(t, "ip", "-n", l.ns.b, "addr", "add", "2001:db8:c2::1/64", "dev", "ve4", "nodad")
	mustRun(t, "ip", "-n", c, "addr", "add", "2001:db8:c2::2/64", "dev", "ve5", "nodad")
	if l.ns.carrierB.Is4() {
		mustRun(t, "ip", "-n", c, "route", "add", l.ns.carrierB.String()+"/32", "via", "198.18.2.1")
	} else {
		mustRun(t, "ip", "-n", c, "route", "add", l.ns.carrierB.String()+"/128", "via", "2001:db8:c2::1")
	}
	return c
}

// forgery is an ICMP error an attacker builds: it quotes a UDP datagram from quotedSrc
// to quotedDst, claiming a payload of claimed bytes of which it quotes quote.
type forgery struct {
	tooBig    bool // "fragmentation needed" / "packet too big" with mtu; else port unreachable
	mtu       int
	quotedSrc netip.AddrPort
	quotedDst netip.AddrPort
	quote     []byte
	claimed   int
}

// message builds the ICMP or ICMPv6 message (for ICMPv6 the kernel fills the checksum).
func (f forgery) message() []byte {
	claimed := max(f.claimed, len(f.quote))
	var inner []byte
	if f.quotedSrc.Addr().Is4() {
		inner = make([]byte, 20, 28+len(f.quote))
		inner[0] = 0x45
		binary.BigEndian.PutUint16(inner[2:], uint16(28+claimed))
		inner[6], inner[8], inner[9] = 0x40, 64, 17
		s, d := f.quotedSrc.Addr().As4(), f.quotedDst.Addr().As4()
		copy(inner[12:], s[:])
		copy(inner[16:], d[:])
		binary.BigEndian.PutUint16(inner[10:], ^checksumFold(checksumAdd(0, inner[:20])))
	} else {
		inner = make([]byte, 40, 48+len(f.quote))
		inner[0] = 0x60
		binary.BigEndian.PutUint16(inner[4:], uint16(8+claimed))
		inner[6], inner[7] = 17, 64
		s, d := f.quotedSrc.Addr().As16(), f.quotedDst.Addr().As16()
		copy(inner[8:], s[:])
		copy(inner[24:], d[:])
	}
	inner = binary.BigEndian.AppendUint16(inner, f.quotedSrc.Port())
	inner = binary.BigEndian.AppendUint16(inner, f.quotedDst.Port())
	inner = binary.BigEndian.AppendUint16(inner, uint16(8+claimed))
	inner = append(inner, 0, 0)
	inner = append(inner, f.quote...)
	msg := make([]byte, 8, 8+len(inner))
	switch {
	case f.quotedSrc.Addr().Is4() && f.tooBig:
		msg[0], msg[1] = 3, 4
		binary.BigEndian.PutUint16(msg[6:], uint16(f.mtu))
	case f.quotedSrc.Addr().Is4():
		msg[0], msg[1] = 3, 3
	case f.tooBig:
		msg[0], msg[1] = 2, 0
		binary.BigEndian.PutUint32(msg[4:], uint32(f.mtu))
	default:
		msg[0], msg[1] = 1, 4
	}
	msg = append(msg, inner...)
	if f.quotedSrc.Addr().Is4() {
		binary.BigEndian.PutUint16(msg[2:], ^checksumFold(checksumAdd(0, msg)))
	}
	return msg
}

// icmpSender is a raw ICMP (ICMPv6) socket opened in a namespace.
type icmpSender struct {
	fd int
	to unix.Sockaddr
}

func newICMPSender(t *testing.T, ns string, to netip.Addr) *icmpSender {
	t.Helper()
	s := &icmpSender{}
	if err := inNetns(ns, func() (err error) {
		if to.Is4() {
			s.fd, err = unix.Socket(unix.AF_INET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_ICMP)
			s.to = &unix.SockaddrInet4{Addr: to.As4()}
		} else {
			s.fd, err = unix.Socket(unix.AF_INET6, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_ICMPV6)
			s.to = &unix.SockaddrInet6{Addr: to.As16()}
		}
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(s.fd) })
	return s
}

// icmpScene starts a link (over an IPv4 or IPv6 carrier) with an off-path attacker
// namespace, and returns the link, the attacker's ICMP sender aimed at b, b's and a's
// carrier sockets, and a destination elsewhere (port given) for reports about others.
func icmpScene(t *testing.T, ipv6 bool, elsewherePort uint16) (l *e2eLink, icmp *icmpSender, bSock, aSock, elsewhere netip.AddrPort) {
	t.Helper()
	l = &e2eLink{}
	l.start(t, ipv6)
	evil := attacker(t, l)
	l.waitUp(t)
	elsewhere = netip.AddrPortFrom(netip.MustParseAddr("198.18.7.7"), elsewherePort)
	if ipv6 {
		elsewhere = netip.AddrPortFrom(netip.MustParseAddr("2001:db8:77::7"), elsewherePort)
	}
	return l, newICMPSender(t, evil, l.ns.carrierB), netip.AddrPortFrom(l.ns.carrierB, 6000),
		netip.AddrPortFrom(l.ns.carrierA, 6000), elsewhere
}

func (s *icmpSender) send(t *testing.T, f forgery) {
	t.Helper()
	if err := unix.Sendto(s.fd, f.message(), 0, s.to); err != nil {
		t.Fatalf("sending a forged ICMP message: %v", err)
	}
}

// TestAttackForgedUnreachable: an off-path host sends b ICMP port unreachables every
// 50 ms for 6 s, quoting b's own ip:port: towards other destinations, towards a (the
// exact 4-tuple) with no payload, and with a ciped header of no session of b's. None
// takes b's link down (it once flapped within a second): errors about other destinations
// are ignored, and those about a only make b ask a, authenticated, and a answers. When a
// really dies (its port closed), b notices within a few seconds, from the ICMP errors
// its own traffic draws and the probes that go unanswered (maxerr).
func TestAttackForgedUnreachable(t *testing.T) {
	requireRoot(t)
	for _, ipv6 := range []bool{false, true} {
		t.Run(fmt.Sprintf("ipv6-carrier=%v", ipv6), func(t *testing.T) {
			l, icmp, bSock, aSock, elsewhere := icmpScene(t, ipv6, 53)
			fakeData := []byte{protocolVersion, messageData, 0, 0, 0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0, 0, 0, 0, 1}
			pings := make(chan int, 1)
			go func() { pings <- ping(t, l.ns.a, e2eTunnelB, 30, "0.2") }()
			for i := range 120 {
				f := forgery{quotedSrc: bSock, quotedDst: aSock, claimed: 100}
				switch i % 3 {
				case 0:
					f.quotedDst = elsewhere
				case 2:
					f.quote = fakeData
				}
				icmp.send(t, f)
				time.Sleep(50 * time.Millisecond)
			}
			if got := <-pings; got < 27 {
				t.Errorf("%d of 30 pings through the tunnel during the attack", got)
			}
			if l.b.count("link down") > 0 {
				t.Fatalf("forged ICMP took b's link down:\n%s", l.b.log.String())
			}

			// Now a dies for real: b's own traffic draws port unreachables from a's host.
			l.a.cmd.Process.Kill()
			<-l.a.done
			died := time.Now()
			traffic := exec.Command("ip", "netns", "exec", l.ns.b, "ping", "-n", "-q", "-c", "50", "-i", "0.2", e2eTunnelA)
			traffic.Start()
			defer func() { traffic.Process.Kill(); traffic.Wait() }()
			l.b.waitLog(t, `link down: .*probes unanswered.*\(maxerr 8\)`, linkBound)
			t.Logf("b noticed a's death %v after it, from ICMP and unanswered probes", time.Since(died).Round(10*time.Millisecond))
			if st := l.b.terminate(t); st != 0 {
				t.Fatalf("b exited with %d", st)
			}
			if foreign := finalCount(t, l.b, "ICMP reports about others ignored"); foreign < 60 {
				t.Errorf("b ignored %d forged reports, want at least the 80 that were not about a or not ours", foreign)
			}
		})
	}
}

// TestAttackForgedTooBig: an off-path host tells b, again and again, that the path to a
// takes tiny packets (IPv4 68, IPv6 80 and 1280), quoting the exact 4-tuple, and other
// destinations. One such report once poisoned the path MTU for ten minutes. Now each is
// only a reason to probe: b's probes of its full size get through, so b keeps its size,
// full-size packets with DF keep passing, and a transfer runs at full size.
func TestAttackForgedTooBig(t *testing.T) {
	requireRoot(t)
	for _, ipv6 := range []bool{false, true} {
		t.Run(fmt.Sprintf("ipv6-carrier=%v", ipv6), func(t *testing.T) {
			l, icmp, bSock, aSock, elsewhere := icmpScene(t, ipv6, 6000)
			mtus := []int{68, 300, 576}
			full := 1440 - 28 // the largest ping with DF through the tunnel
			if ipv6 {
				mtus, full = []int{80, 1280, 1300}, 1420-28
			}
			stop := make(chan struct{})
			go func() {
				for i := 0; ; i++ {
					select {
					case <-stop:
						return
					case <-time.After(20 * time.Millisecond):
					}
					f := forgery{tooBig: true, mtu: mtus[i%len(mtus)], quotedSrc: bSock, quotedDst: aSock, claimed: 1400}
					if i%4 == 3 {
						f.quotedDst = elsewhere
					}
					icmp.send(t, f)
				}
			}()
			defer close(stop)
			time.Sleep(time.Second) // a thousand-odd reports in, while b probes
			out, err := exec.Command("ip", "netns", "exec", l.ns.b, "ping", "-n", "-q", "-M", "do", "-s", fmt.Sprint(full),
				"-c", "10", "-i", "0.1", "-W", "2", e2eTunnelA).CombinedOutput()
			if err != nil || !strings.Contains(string(out), " 10 received") {
				t.Fatalf("full-size pings with DF from b during the attack: %v\n%s", err, out)
			}
			if sent, got := transfer(t, l.ns.b, l.ns.a, e2eTunnelA, 5<<20, nil, 0); sent != got {
				t.Fatalf("transfer from b during the attack: sent %x, received %x", sent, got)
			}
			if l.b.count("path MTU: the path") > 0 || l.b.count("told senders") > 0 {
				t.Fatalf("b changed its path MTU on forged reports:\n%s", l.b.log.String())
			}
		})
	}
}

// sentTo picks from captured frames the UDP datagrams from src to dst.
func sentTo(frames [][]byte, src, dst netip.Addr) []udpPacket {
	var out []udpPacket
	for _, p := range udpPackets(frames) {
		if p.src.Addr() == src && p.dst.Addr() == dst {
			out = append(out, p)
		}
	}
	return out
}

// TestAttackAmplification: nothing unauthenticated earns more than one datagram back,
// nor more bytes than it carried.
//   - A dial-up hub (peer=0.0.0.0:0) that holds no session gets forged data messages: it
//     answers at most some of them, each with one unknown-session message of 32 bytes,
//     no larger than what it answers (it once sent initiations, 2.4 times the bytes,
//     every second, to whatever source the forgery named).
//   - A recorded initiation replayed to the hub after it restarted: one response per
//     replay, and nothing more (it once sent an initiation to the replay's source every
//     tokxc until the session expired, some 63 datagrams per replay).
//   - After toping takes the hub's link down (the client died), the hub sends nothing
//     to the client's last address (it once sent an initiation there every second).
func TestAttackAmplification(t *testing.T) {
	requireRoot(t)
	dir := t.TempDir()
	ns := newNetnsPair(t, false)
	l := &e2eLink{ns: ns, dir: dir}
	evil := attacker(t, l)
	evilAddr := netip.MustParseAddr("198.18.2.2")
	hubArgs := []string{"-o", keyFile(t, dir, "ob", testKey), "me=198.18.0.2:6000", "peer=0.0.0.0:0",
		"ipaddr=" + e2eTunnelB, "tokxc=1", "tokey=60", "ping=1", "toping=3", "debug"}
	hub := startDaemon(t, "hub", ns.b, hubArgs...)
	hub.waitLog(t, "whoever authenticates first", linkBound)

	// Forged data for sessions the hub does not hold.
	stop := make(chan struct{})
	frames := capture(t, ns.b, "ve4", stop)
	c := udpFrom(t, evil)
	to := &net.UDPAddr{IP: net.IP(ns.carrierB.AsSlice()), Port: 6000}
	forged := make([]byte, 64)
	forged[offsetVersion], forged[offsetType] = protocolVersion, messageData
	const sent = 200
	for i := range sent {
		binary.BigEndian.PutUint32(forged[dataOffReceiver:], uint32(i+1))
		c.WriteToUDP(forged, to)
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(300 * time.Millisecond)
	close(stop)
	back := sentTo(<-frames, ns.carrierB, evilAddr)
	for _, p := range back {
		if len(p.payload) > len(forged) || len(p.payload) != unknownSessionSize || p.payload[offsetType] != messageUnknownSession {
			t.Fatalf("the hub answered forged data with %d bytes of type %d", len(p.payload), p.payload[offsetType])
		}
	}
	if len(back) > sent || len(back) > 3*unknownSessionRate {
		t.Fatalf("the hub answered %d forged data messages (sent %d in 2 s)", len(back), sent)
	}
	t.Logf("%d forged data messages (64 bytes) in 2 s: %d answers of %d bytes", sent, len(back), unknownSessionSize)

	// A real client comes, its initiation recorded on the way.
	stop = make(chan struct{})
	carrier := capture(t, ns.b, "ve1", stop)
	client := startDaemon(t, "client", ns.a, "-o", keyFile(t, dir, "oa", testKey), "me=198.18.0.1:6000",
		"peer=198.18.0.2:6000", "ipaddr="+e2eTunnelA, "ptpaddr="+e2eTunnelB, "tokxc=1", "tokey=60", "debug")
	hub.waitLog(t, "link up", linkBound)
	client.waitLog(t, "link up", linkBound)
	close(stop)
	var initiation [exchangeParts][]byte // the last initiation's parts
	for _, p := range sentTo(<-carrier, ns.carrierA, ns.carrierB) {
		if len(p.payload) == initiationPartSize && p.payload[offsetType] == messageInitiation {
			initiation[p.payload[offsetPart]] = p.payload
		}
	}
	if initiation[0] == nil || initiation[1] == nil ||
		!bytes.Equal(initiation[0][initiationOffSender:initiationHeaderSize], initiation[1][initiationOffSender:initiationHeaderSize]) {
		t.Fatal("no initiation recorded")
	}

	// The hub restarts, and the recording is replayed to it from elsewhere.
	if st := hub.terminate(t); st != 0 {
		t.Fatalf("hub exited with %d", st)
	}
	hub = startDaemon(t, "hub again", ns.b, hubArgs...)
	hub.waitLog(t, "whoever authenticates first", linkBound)
	client.cmd.Process.Kill() // the client must not confirm anything for the replay
	<-client.done
	stop = make(chan struct{})
	frames = capture(t, ns.b, "ve4", stop)
	for range 3 {
		c.WriteToUDP(initiation[0], to)
		c.WriteToUDP(initiation[1], to)
		time.Sleep(500 * time.Millisecond)
	}
	time.Sleep(5 * time.Second) // five times tokxc
	close(stop)
	back = sentTo(<-frames, ns.carrierB, evilAddr)
	for _, p := range back {
		if p.payload[offsetType] != messageResponse || len(p.payload) >= initiationPartSize {
			t.Fatalf("the hub sent the replay's source a message of type %d, %d bytes", p.payload[offsetType], len(p.payload))
		}
	}
	if len(back) > exchangeParts {
		t.Fatalf("3 replayed initiations (2 parts each) drew %d datagrams", len(back))
	}
	t.Logf("3 replayed initiations after a restart: %d response parts, nothing else in 5 s (tokxc=1)", len(back))

	// The client comes back, then dies for good: toping takes the hub's link down, and
	// then the hub keeps quiet.
	client = startDaemon(t, "client again", ns.a, "-o", keyFile(t, dir, "oa", testKey), "me=198.18.0.1:6000",
		"peer=198.18.0.2:6000", "ipaddr="+e2eTunnelA, "ptpaddr="+e2eTunnelB, "tokxc=1", "tokey=60", "debug")
	hub.waitLog(t, "link up", linkBound)
	client.cmd.Process.Kill()
	<-client.done
	hub.waitLog(t, `link down: no word from the peer`, linkBound)
	stop = make(chan struct{})
	frames = capture(t, ns.b, "ve1", stop)
	time.Sleep(4 * time.Second)
	close(stop)
	if quiet := sentTo(<-frames, ns.carrierB, ns.carrierA); len(quiet) > 0 {
		t.Fatalf("after its link went down the hub sent %d datagrams to the client's old address", len(quiet))
	}
}

// TestAttackPeerClaims: a peer holding the key is still a stranger to this host. A hub
// that learns the peer's tunnel address refuses a claim of one of its own addresses, of
// the peer's carrier address, of a link-local address, of one outside ptpaddr's range,
// and, once it has learned one, of any other: the link stays down (no route is made for
// the claim) and the refusal is logged. (Loopback, multicast, broadcast and unspecified
// addresses no ciped accepts as ipaddr: TestTunnelLearnedAddress claims them.)
func TestAttackPeerClaims(t *testing.T) {
	requireRoot(t)
	dir := t.TempDir()
	ns := newNetnsPair(t, false)
	hub := startDaemon(t, "hub", ns.b, "-o", keyFile(t, dir, "ob", testKey), "me=198.18.0.2:6000", "peer=0.0.0.0:0",
		"ipaddr="+e2eTunnelB, "ptpaddr=10.99.0.0/24", "debug")
	hub.waitLog(t, "whoever authenticates first", linkBound)
	claim := func(addr string) *daemon {
		return startDaemon(t, "client "+addr, ns.a, "-o", keyFile(t, dir, "oa", testKey), "me=198.18.0.1:6000",
			"peer=198.18.0.2:6000", "ipaddr="+addr, "ptpaddr="+e2eTunnelB, "tokxc=1", "debug")
	}
	for _, c := range []struct{ addr, why string }{
		{"10.99.5.5", "outside ptpaddr's range 10.99.0.0/24"},
	} {
		d := claim(c.addr)
		hub.waitLog(t, `refused: peer's tunnel address `+regexp.QuoteMeta(c.addr)+` cannot be ours to learn: it is `+c.why, linkBound)
		d.terminate(t)
	}
	if hub.count("link up") > 0 {
		t.Fatalf("the hub took a bad claim:\n%s", hub.log.String())
	}
	hub.terminate(t)

	// Without a range: the carrier addresses and link-local ones are refused all the same.
	hub = startDaemon(t, "hub, no range", ns.b, "-o", keyFile(t, dir, "ob", testKey), "me=198.18.0.2:6000",
		"peer=0.0.0.0:0", "ipaddr="+e2eTunnelB, "debug")
	hub.waitLog(t, "whoever authenticates first", linkBound)
	mustRun(t, "ip", "-n", ns.b, "addr", "add", "10.77.7.7/32", "dev", "lo") // one of the hub's own
	for _, c := range []struct{ addr, why string }{
		{"198.18.0.1", "the peer's carrier address"},
		{"10.77.7.7", "an address of this host"},
		{"169.254.7.7", "a link-local address"},
	} {
		d := claim(c.addr)
		hub.waitLog(t, `refused: peer's tunnel address `+regexp.QuoteMeta(c.addr)+` cannot be ours to learn: it is `+c.why, linkBound)
		d.terminate(t)
	}
	if hub.count("link up") > 0 {
		t.Fatalf("the hub took a bad claim:\n%s", hub.log.String())
	}
	// A good claim is learned, for good: a later one of another address is refused.
	d := claim(e2eTunnelA)
	hub.waitLog(t, "learned the peer's tunnel address "+e2eTunnelA, linkBound)
	hub.waitLog(t, "link up", linkBound)
	d.terminate(t)
	hub.waitLog(t, "link down", linkBound)
	d = claim("10.99.0.9")
	hub.waitLog(t, `refused: the peer claims another tunnel address than the one learned: it says 10.99.0.9, it was `+e2eTunnelA, linkBound)
	d.terminate(t)
	if got := hub.count("link up"); got != 1 {
		t.Fatalf("the hub's link came up %d times, want once", got)
	}
	if addrs := mustRun(t, "ip", "-n", ns.b, "addr", "show", "dev", "cipcb0"); strings.Contains(addrs, "10.99.0.9") ||
		strings.Contains(addrs, "169.254.7.7") || !strings.Contains(addrs, "peer "+e2eTunnelA) {
		t.Fatalf("the hub's interface:\n%s", addrs)
	}
}

// fakePeer speaks ciped's protocol from a socket in a namespace, with ciped's own key
// exchange and sessions: a peer that a test can make flap as fast as a round trip.
type fakePeer struct {
	conn  *net.UDPConn
	to    *net.UDPAddr
	kx    *keyExchange
	s     *session
	nonce [12]byte
	buf   []byte
}

func newFakePeer(t *testing.T, ns string, to netip.AddrPort, ipaddr, expected string) *fakePeer {
	t.Helper()
	key, _ := hex.DecodeString(testKey)
	return &fakePeer{conn: udpFrom(t, ns), to: net.UDPAddrFromAddrPort(to), buf: make([]byte, 2048),
		kx: &keyExchange{cfg: exchangeConfig{secrets: deriveLinkSecrets([linkKeySize]byte(key)), ciphers: knownCiphers,
			mtu: 1440, addr: netip.MustParseAddr(ipaddr), expected: netip.MustParseAddr(expected)}, wallClock: time.Now}}
}

// connect makes a session with the other end and confirms it (a keepalive asking for one
// back): the other end's link comes up.
func (p *fakePeer) connect(t *testing.T) {
	t.Helper()
	parts, err := p.kx.initiate(time.Now())
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range parts {
		p.conn.WriteToUDP(m, p.to)
	}
	p.conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	for {
		n, _, err := p.conn.ReadFromUDP(p.buf)
		if err != nil {
			t.Fatalf("fake peer: no response: %v", err)
		}
		if n == responsePartSize && p.buf[offsetType] == messageResponse {
			res, err := p.kx.consumeResponse(p.buf[:n], p.to.AddrPort(), time.Now())
			if errors.Is(err, errAwaitingPart) {
				continue
			}
			if err != nil {
				t.Fatalf("fake peer: %v", err)
			}
			p.s = res.session
			break
		}
	}
	p.keepalive(flagPing)
}

// keepalive sends an empty data message with flags under the session.
func (p *fakePeer) keepalive(flags byte) {
	counter, _ := p.s.reserveCounters(1)
	p.conn.WriteToUDP(p.s.seal(make([]byte, dataOverhead), 0, flags, counter, &p.nonce), p.to)
}

// exchange sends an inner packet and returns the first IPv4 packet that comes back (the
// other end's kernel may send IPv6 neighbour discovery meanwhile).
func (p *fakePeer) exchange(t *testing.T, pkt []byte) []byte {
	t.Helper()
	counter, _ := p.s.reserveCounters(1)
	buf := make([]byte, dataOverhead+len(pkt))
	p.conn.WriteToUDP(p.s.sealTo(buf, pkt, 0, counter, &p.nonce), p.to)
	p.conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	for {
		n, _, err := p.conn.ReadFromUDP(p.buf)
		if err != nil {
			t.Fatalf("fake peer: nothing came back: %v", err)
		}
		h, err := parseDataHeader(p.buf[:n])
		if err != nil || h.flags&(flagProbe|flagProbeAck) != 0 {
			continue
		}
		if inner, err := p.s.open(p.buf[:n], h, &p.nonce); err == nil && len(inner) > 0 && inner[0]>>4 == 4 {
			return inner
		}
	}
}

// TestAttackScripts: ip-up starts a child in the background and fails; ip-down hangs.
// A peer flaps 50 times, as fast as a round trip allows. The link's life goes on: the
// changes collapse into the few script runs that matter (ups and downs alternating), the
// link comes up again and carries traffic, and SIGTERM ends ciped within its bound
// (10 s for the scripts), killing the hanging script with its process group.
func TestAttackScripts(t *testing.T) {
	requireRoot(t)
	dir := t.TempDir()
	ns := newNetnsPair(t, false)
	up := writeScript(t, dir, "ip-up", fmt.Sprintf("echo up >> %[1]s/calls\nsleep 300 &\necho $! >> %[1]s/left\nexit 3\n", dir))
	down := writeScript(t, dir, "ip-down", fmt.Sprintf("echo down >> %[1]s/calls\necho $$ >> %[1]s/hung\nexec sleep 300\n", dir))
	t.Cleanup(func() {
		for _, f := range []string{"left", "hung"} {
			b, _ := os.ReadFile(filepath.Join(dir, f))
			for _, pid := range strings.Fields(string(b)) {
				if n, err := strconv.Atoi(pid); err == nil && n > 1 {
					syscall.Kill(n, syscall.SIGKILL)
				}
			}
		}
	})
	hub := startDaemon(t, "hub", ns.b, "-o", keyFile(t, dir, "ob", testKey), "me=198.18.0.2:6000", "peer=0.0.0.0:0",
		"ipaddr="+e2eTunnelB, "ptpaddr="+e2eTunnelA, "ipup="+up, "ipdown="+down, "debug")
	hub.waitLog(t, "whoever authenticates first", linkBound)
	peer := newFakePeer(t, ns.a, netip.MustParseAddrPort("198.18.0.2:6000"), e2eTunnelA, e2eTunnelB)
	for range 50 {
		peer.connect(t)
		peer.keepalive(flagGoodbye)
	}
	peer.connect(t)
	waitFor(t, "the hub's link up after the flaps", linkBound, func() bool {
		return hub.count("link up") == hub.count("link down")+1
	})
	if downs := hub.count("link down: the peer shut down"); downs < 10 {
		t.Fatalf("the link went down %d times in 50 flaps", downs)
	}
	// The link carries traffic: a ping through it, answered by the hub's kernel.
	echo := numberedPing(e2eTunnelA, e2eTunnelB, 7)
	echo[22], echo[23] = 0, 0 // a real kernel checks the checksums
	binary.BigEndian.PutUint16(echo[22:], ^checksumFold(checksumAdd(0, echo[20:])))
	setIPv4HeaderChecksum(echo, 20)
	hub.cmd.Process.Signal(syscall.SIGUSR1)
	time.Sleep(200 * time.Millisecond)
	reply := peer.exchange(t, echo)
	if len(reply) < 28 || reply[20] != 0 || pingNumber(reply) != 7 {
		t.Fatalf("through the link after the flaps: %x", reply)
	}
	if !hub.running() {
		t.Fatal("the hub died")
	}
	started := time.Now()
	if st := hub.terminate(t); st != 0 {
		t.Fatalf("the hub exited with %d", st)
	}
	took := time.Since(started)
	if took > scriptsAtStopMax+scriptPipeWait+10*time.Second {
		t.Fatalf("SIGTERM took %v, beyond the bound", took)
	}
	calls := readLines(t, filepath.Join(dir, "calls"))
	for i, c := range calls {
		if want := []string{"up", "down"}[i%2]; c != want {
			t.Fatalf("script %d was %s: ups and downs do not alternate: %v", i, c, calls)
		}
	}
	if len(calls) > 10 {
		t.Fatalf("%d scripts ran for 50 flaps while ip-down hung: nothing collapsed", len(calls))
	}
	for _, pid := range readLines(t, filepath.Join(dir, "hung")) {
		n, _ := strconv.Atoi(pid)
		waitFor(t, "the hanging ip-down to be killed", 10*time.Second, func() bool { return syscall.Kill(n, 0) != nil })
	}
	if hub.count(`ip-up: .* failed: exit status 3`) == 0 || hub.count(`ip-down: .* killed after`) == 0 {
		t.Fatalf("the hub's log does not tell of the failed ip-up and the killed ip-down:\n%s", hub.log.String())
	}
	t.Logf("50 flaps (%d link downs): %d scripts ran (%v); SIGTERM done in %v", hub.count("link down: the peer"),
		len(calls), calls, took.Round(100*time.Millisecond))
}

// innerUDP builds an IPv4 or IPv6 packet carrying a UDP datagram, checksums complete.
func innerUDP(src, dst netip.AddrPort, payload []byte) []byte {
	udp := make([]byte, 8, 8+len(payload))
	binary.BigEndian.PutUint16(udp[0:], src.Port())
	binary.BigEndian.PutUint16(udp[2:], dst.Port())
	binary.BigEndian.PutUint16(udp[4:], uint16(8+len(payload)))
	udp = append(udp, payload...)
	var ip []byte
	if src.Addr().Is4() {
		ip = make([]byte, 20)
		ip[0], ip[8], ip[9] = 0x45, 64, 17
		binary.BigEndian.PutUint16(ip[2:], uint16(20+len(udp)))
		s, d := src.Addr().As4(), dst.Addr().As4()
		copy(ip[12:], s[:])
		copy(ip[16:], d[:])
		setIPv4HeaderChecksum(ip, 20)
	} else {
		ip = make([]byte, 40)
		ip[0], ip[6], ip[7] = 0x60, 17, 64
		binary.BigEndian.PutUint16(ip[4:], uint16(len(udp)))
		s, d := src.Addr().As16(), dst.Addr().As16()
		copy(ip[8:], s[:])
		copy(ip[24:], d[:])
	}
	pkt := append(ip, udp...)
	setPartialChecksum(pkt, len(ip), ipProtoUDP, udpCsumOffset)
	completeChecksum(pkt)
	return pkt
}

// send seals an inner packet under the fake peer's session and sends it.
func (p *fakePeer) send(pkt []byte) {
	counter, _ := p.s.reserveCounters(1)
	buf := make([]byte, dataOverhead+len(pkt))
	p.conn.WriteToUDP(p.s.sealTo(buf, pkt, 0, counter, &p.nonce), p.to)
}

// TestAttackSpoofedSources: a peer that holds the key sends packets with sources it
// does not own. With the kernel's loose reverse-path filter (systemd's default; and IPv6
// has none), one from 192.0.2.55 once reached a local socket on the other host. Now only
// sources the host routes back through the tunnel get in: the peer's tunnel address,
// and a network ip-up routes there (from the moment the route exists, no restart);
// anything else is dropped and counted. rpfilter=no lets all in (asymmetric routing).
func TestAttackSpoofedSources(t *testing.T) {
	requireRoot(t)
	for _, c := range []struct {
		name                  string
		ours, theirs, spoofed string
		routed, routedNet     string
		rpfilter              bool
	}{
		{"IPv4", "10.99.0.2", "10.99.0.1", "192.0.2.55", "192.168.2.5", "192.168.2.0/24", true},
		{"IPv6", "fd00:99::2", "fd00:99::1", "2001:db8:bad::1", "fd00:2::5", "fd00:2::/64", true},
		{"IPv4, rpfilter=no", "10.99.0.2", "10.99.0.1", "192.0.2.55", "192.168.2.5", "192.168.2.0/24", false},
	} {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			ns := newNetnsPair(t, false)
			// The kernel's own filter, as loose as systemd sets it, on a host with default
			// routes (which that filter takes as a way back for any source).
			mustRun(t, "ip", "netns", "exec", ns.b, "sysctl", "-qw", "net.ipv4.conf.all.rp_filter=2", "net.ipv4.conf.default.rp_filter=2")
			mustRun(t, "ip", "-n", ns.b, "route", "add", "default", "via", "198.18.0.1")
			mustRun(t, "ip", "-n", ns.b, "-6", "route", "add", "default", "dev", "ve1")
			args := []string{"-o", keyFile(t, dir, "ob", testKey), "me=198.18.0.2:6000", "peer=0.0.0.0:0",
				"ipaddr=" + c.ours, "ptpaddr=" + c.theirs, "device=cipcb0", "debug"}
			if !c.rpfilter {
				args = append(args, "rpfilter=no")
			}
			b := startDaemon(t, "b", ns.b, args...)
			b.waitLog(t, "whoever authenticates first", linkBound)
			var listener *net.UDPConn
			if err := inNetns(ns.b, func() (err error) {
				listener, err = net.ListenUDP("udp", &net.UDPAddr{Port: 7777})
				return err
			}); err != nil {
				t.Fatal(err)
			}
			defer listener.Close()
			received := make(chan string, 64)
			go func() {
				buf := make([]byte, 1500)
				for {
					n, from, err := listener.ReadFromUDP(buf)
					if err != nil {
						return
					}
					received <- from.IP.String() + " " + string(buf[:n])
				}
			}()
			peer := newFakePeer(t, ns.a, netip.MustParseAddrPort("198.18.0.2:6000"), c.theirs, c.ours)
			peer.connect(t)
			b.waitLog(t, "link up", linkBound)
			dst := netip.AddrPortFrom(netip.MustParseAddr(c.ours), 7777)
			from := func(a string) netip.AddrPort { return netip.AddrPortFrom(netip.MustParseAddr(a), 4000) }
			seen := map[string]bool{}
			got := func(want string, wait time.Duration) bool {
				deadline := time.After(wait)
				for !seen[want] {
					select {
					case r := <-received:
						_, what, _ := strings.Cut(r, " ")
						seen[what] = true
					case <-deadline:
						return false
					}
				}
				return true
			}
			peer.send(innerUDP(from(c.spoofed), dst, []byte("spoofed")))
			peer.send(innerUDP(from(c.theirs), dst, []byte("genuine")))
			if !got("genuine", 5*time.Second) {
				t.Fatal("the peer's own packet did not arrive")
			}
			if seen["spoofed"] != !c.rpfilter {
				t.Fatalf("the spoofed packet arrived: %v (rpfilter %v)", seen["spoofed"], c.rpfilter)
			}
			// A network routed through the tunnel (as ip-up would) may be claimed from then on.
			mustRun(t, "ip", "-n", ns.b, "route", "add", c.routedNet, "dev", "cipcb0")
			ok := false
			for i := 0; i < 50 && !ok; i++ {
				peer.send(innerUDP(from(c.routed), dst, []byte("routed")))
				ok = got("routed", 200*time.Millisecond)
			}
			if !ok {
				t.Fatal("a packet from a network routed through the tunnel did not arrive")
			}
			if st := b.terminate(t); st != 0 {
				t.Fatalf("b exited with %d", st)
			}
			dropped := b.count(`dropped \d+ packets from the peer whose source this host does not route`)
			if c.rpfilter && dropped == 0 || !c.rpfilter && dropped != 0 {
				t.Fatalf("b logged %d drops of spoofed sources (rpfilter %v)", dropped, c.rpfilter)
			}
		})
	}
}
