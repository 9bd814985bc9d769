package main

import (
	"net/netip"
	"slices"
	"syscall"
	"testing"
	"time"
)

// proberRun drives a prober through rounds: at each round the path takes messages of up
// to fits bytes (0: none at all); it returns the size the prober settled on and the
// number of probes it sent.
func proberRun(t *testing.T, p *pathProber, now time.Time, fits int) (time.Time, int) {
	t.Helper()
	probes := 0
	for i := 0; len(p.probing) > 0; i++ {
		if i > 100 {
			t.Fatalf("the search does not end: %+v", p)
		}
		for _, s := range p.tick(now, true) {
			probes++
			if s <= fits {
				p.ack(now.Add(time.Millisecond), s)
			}
		}
		now = now.Add(p.wait())
	}
	return now, probes
}

// TestPathProber: the path MTU search, case by case (sizes are messages: IPv4 carrier,
// 28 bytes of headers, mtu 1440 + 32).
func TestPathProber(t *testing.T) {
	const header, largest = 28, 1472
	t0 := time.Unix(1000, 0)
	newP := func() *pathProber { return newPathProber(largest, header, false, false) }

	t.Run("a path that takes everything confirms the size and keeps it", func(t *testing.T) {
		p := newP()
		p.start(t0, false)
		if _, probes := proberRun(t, p, t0, 1500); p.current != largest || probes != 1 {
			t.Fatalf("current %d after %d probes", p.current, probes)
		}
	})
	t.Run("a forged report changes nothing, and the next ones wait", func(t *testing.T) {
		p := newP()
		p.hint(t0, 68, false)
		if !slices.Equal(p.probing, []int{largest, floorIPv4 - header}) {
			t.Fatalf("probing %v: want the current size and the floor (68 is below it)", p.probing)
		}
		now, _ := proberRun(t, p, t0, 1500)
		if p.current != largest {
			t.Fatalf("current %d after a forged report", p.current)
		}
		p.hint(now, 1000, false)
		if len(p.probing) != 0 {
			t.Fatal("a report right after one proven wrong started a search")
		}
		p.hint(now.Add(hintHoldoff), 1000, false)
		if len(p.probing) == 0 {
			t.Fatal("a report after the hold-off started no search")
		}
	})
	t.Run("a true report lowers the size once the larger probe fails", func(t *testing.T) {
		p := newP()
		p.hint(t0, 1300, false)
		now, probes := proberRun(t, p, t0, 1300-header)
		if p.current != 1300-header {
			t.Fatalf("current %d, want %d", p.current, 1300-header)
		}
		if probes > 2*probeRounds {
			t.Fatalf("%d probes for two sizes", probes)
		}
		if took := now.Sub(t0); took > probeRounds*probeWait+probeWait {
			t.Fatalf("the search took %v", took)
		}
	})
	t.Run("a black hole is found without any report, down the plateaus", func(t *testing.T) {
		p := newP()
		p.start(t0, false)
		proberRun(t, p, t0, 1380-header)
		if p.current != 1380-header {
			t.Fatalf("current %d, want the 1380 plateau's %d", p.current, 1380-header)
		}
	})
	t.Run("nothing gets through: the size stays (the peer is away, not the path small)", func(t *testing.T) {
		p := newP()
		p.hint(t0, 1200, false)
		proberRun(t, p, t0, 0)
		if p.current != largest {
			t.Fatalf("current %d", p.current)
		}
	})
	t.Run("never below the floor", func(t *testing.T) {
		p := newP()
		p.hint(t0, 200, false)
		proberRun(t, p, t0, floorIPv4-header) // and no more
		if p.current != floorIPv4-header {
			t.Fatalf("current %d, want the floor %d", p.current, floorIPv4-header)
		}
		p6 := newPathProber(1452, 48, true, false)
		p6.hint(t0, 80, false) // once made the size negative
		proberRun(t, p6, t0, 1500)
		if p6.current != 1452 || p6.floor != floorIPv6-48 {
			t.Fatalf("IPv6: current %d, floor %d", p6.current, p6.floor)
		}
	})
	t.Run("the path grows again", func(t *testing.T) {
		p := newP()
		p.hint(t0, 1300, false)
		now, _ := proberRun(t, p, t0, 1300-header)
		p.grow(now)
		proberRun(t, p, now, 1500)
		if p.current != largest {
			t.Fatalf("current %d after the path grew", p.current)
		}
	})
	t.Run("this host's own interface is believed at once and bounds growth", func(t *testing.T) {
		p := newP()
		p.hint(t0, 1300, true)
		if p.current != 1300-header || p.max != 1300-header || len(p.probing) != 0 {
			t.Fatalf("current %d, max %d, probing %v", p.current, p.max, p.probing)
		}
		p.grow(t0)
		if len(p.probing) != 0 {
			t.Fatal("grows past the interface")
		}
	})
	t.Run("nokey cannot probe: it believes reports, within the floor", func(t *testing.T) {
		p := newPathProber(1472, 28, false, true)
		p.start(t0, false)
		p.hint(t0, 1300, false)
		if p.current != 1272 || len(p.tick(t0, true)) != 0 {
			t.Fatalf("current %d", p.current)
		}
	})
	t.Run("the wait follows the round trip", func(t *testing.T) {
		p := newP()
		p.start(t0, false)
		p.tick(t0, true)
		p.ack(t0.Add(2*time.Millisecond), largest)
		if w := p.wait(); w != probeWaitMin {
			t.Fatalf("wait %v after a 2 ms round trip, want %v", w, probeWaitMin)
		}
	})
	t.Run("a busy link confirms its size now and then", func(t *testing.T) {
		p := newP()
		p.start(t0, false)
		now, _ := proberRun(t, p, t0, 1500)
		if p.tick(now, true) != nil || p.tick(now.Add(probeConfirm), false) != nil {
			t.Fatal("probed before it was due, or on an idle link")
		}
		if got := p.tick(now.Add(probeConfirm), true); !slices.Equal(got, []int{largest}) {
			t.Fatalf("confirmation probes %v", got)
		}
	})
}

// TestCarrierReports: an ICMP report counts against the link only if it names a
// datagram we sent to the peer: its destination, and where it quotes enough, a ciped
// header for a session we hold; this host's own "too big" names no port.
func TestCarrierReports(t *testing.T) {
	cfg := testConfig("10.0.0.1", "10.0.0.2")
	cfg.peer = netip.MustParseAddrPort("198.18.0.2:6000")
	c := newLinkCore(cfg, newLogger(testLog{t: t, name: "reports"}, "r", true), &sinkCarrier{}, "r")
	si, _ := katSessions(t, cipherAES256GCM, 0x11111111, 0x22222222, 0)
	c.keys.rotate(si)
	c.up.Store(true)
	c.pendingIndex.Store(0x33333333)
	quote := func(b ...byte) ([quoteKept]byte, int) {
		var q [quoteKept]byte
		return q, copy(q[:], b)
	}
	dataQ, dataN := quote(protocolVersion, messageData, 0, 0, 0x22, 0x22, 0x22, 0x22, 0, 0, 0, 0, 0, 0, 0, 9)
	otherQ, otherN := quote(protocolVersion, messageData, 0, 0, 0x44, 0x44, 0x44, 0x44)
	initQ, initN := quote(protocolVersion, messageInitiation, 0, 0, 0x33, 0x33, 0x33, 0x33)
	oldInitQ, oldInitN := quote(protocolVersion, messageInitiation, 0, 0, 0x55, 0x55, 0x55, 0x55)
	plainQ, plainN := quote(0x45, 0, 0, 84)
	other := netip.MustParseAddrPort("198.18.9.9:7777")
	for _, tc := range []struct {
		name  string
		r     carrierReport
		mine  bool
		hint  int
		local int
	}{
		{"the exact 4-tuple, no quote", carrierReport{dst: cfg.peer}, true, 0, 0},
		{"another destination", carrierReport{dst: other}, false, 0, 0},
		{"the peer's address, another port", carrierReport{dst: netip.AddrPortFrom(cfg.peer.Addr(), 6001)}, false, 0, 0},
		{"a data message of our session", carrierReport{dst: cfg.peer, quote: dataQ, quoted: dataN}, true, 0, 0},
		{"a data message of no session of ours", carrierReport{dst: cfg.peer, quote: otherQ, quoted: otherN}, false, 0, 0},
		{"our pending initiation", carrierReport{dst: cfg.peer, quote: initQ, quoted: initN}, true, 0, 0},
		{"an initiation we did not send", carrierReport{dst: cfg.peer, quote: oldInitQ, quoted: oldInitN}, false, 0, 0},
		{"not a ciped message", carrierReport{dst: cfg.peer, quote: plainQ, quoted: plainN}, false, 0, 0},
		{"too big, for our session", carrierReport{kind: reportTooBig, mtu: 1300, dst: cfg.peer, quote: dataQ, quoted: dataN}, false, 1300, 0},
		{"too big, for someone else", carrierReport{kind: reportTooBig, mtu: 68, dst: other}, false, 0, 0},
		{"too big, from this host (no port)", carrierReport{kind: reportLocalTooBig, mtu: 1400, dst: netip.AddrPortFrom(cfg.peer.Addr(), 0)}, false, 0, 1400},
	} {
		t.Run(tc.name, func(t *testing.T) {
			errsBefore, foreignBefore := c.carrierErrors.Load(), c.stats.carrierForeign.Load()
			c.pathHint.Store(0)
			c.localMTU.Store(0)
			r := tc.r
			c.noteCarrierError(&unreachableError{count: 1, reports: []carrierReport{r}, err: syscall.ECONNREFUSED})
			mine := c.carrierErrors.Load() - errsBefore
			foreign := c.stats.carrierForeign.Load() - foreignBefore
			if (mine == 1) != tc.mine || int(c.pathHint.Load()) != tc.hint || int(c.localMTU.Load()) != tc.local {
				t.Fatalf("counted %d against the link (%d foreign), hint %d, local %d", mine, foreign,
					c.pathHint.Load(), c.localMTU.Load())
			}
			if judged := mine == 1 || tc.hint != 0 || tc.local != 0; judged == (foreign == 1) {
				t.Fatalf("judged %v and foreign %d", judged, foreign)
			}
		})
	}
	// Reports beyond those kept are not judged, and not held against the link.
	errsBefore := c.carrierErrors.Load()
	c.noteCarrierError(&unreachableError{count: 1000, err: syscall.ECONNREFUSED})
	if c.carrierErrors.Load() != errsBefore {
		t.Fatal("reports that were not kept counted against the link")
	}
}
