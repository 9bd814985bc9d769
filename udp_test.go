package main

import (
	"encoding/binary"
	"fmt"
	"io"
	"math/rand/v2"
	"net/netip"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

// builtDatagram is one datagram as a sendmmsg built by the carrier would put it on the
// wire: its bytes and the TTL and TOS its control messages ask for (0: the socket's).
type builtDatagram struct {
	b        []byte
	ttl, tos int
	frag     bool // sent with fragmentation allowed
}

// builderCarrier runs what the outbound loop sends through the real carrier's message
// builder (udpCarrier.fill) and decodes the mmsghdrs it builds, instead of sending them.
type builderCarrier struct {
	sinkCarrier
	c   *udpCarrier
	got []builtDatagram
	err error
}

func newBuilderCarrier(ipv6, gso bool) *builderCarrier {
	c := &udpCarrier{ipv6: ipv6, whdrs: make([]mmsghdr, writeSlots), wiovs: make([]unix.Iovec, 2*writeSlots),
		wcmsgs: make([]byte, writeSlots*cmsgRoom), wmsg: make([]int, writeSlots)}
	c.gso.Store(gso)
	return &builderCarrier{c: c}
}

func (bc *builderCarrier) WriteBatch(msgs []carrierMsg, to netip.AddrPort) error {
	c := bc.c
	namelen, err := c.putSockaddr(&c.wname, to)
	if err != nil {
		return err
	}
	for next := 0; next < len(msgs); {
		hdrs, done := c.fill(msgs, next, namelen)
		if hdrs == 0 {
			return fmt.Errorf("message %d does not fit a batch", next)
		}
		for k := range hdrs {
			if err := bc.decode(k, msgs[c.wmsg[k]].frag); err != nil && bc.err == nil {
				bc.err = err
			}
		}
		next += done
	}
	return nil
}

// decode reads mmsghdr k back: its datagrams and what its control messages say.
func (bc *builderCarrier) decode(k int, frag bool) error {
	c := bc.c
	h := &c.whdrs[k].hdr
	var payload []byte
	for _, iov := range unsafe.Slice(h.Iov, h.Iovlen) {
		payload = append(payload, unsafe.Slice(iov.Base, iov.Len)...)
	}
	ttl, tos, segSize := 0, 0, 0
	if h.Controllen > 0 {
		off := int(uintptr(unsafe.Pointer(h.Control)) - uintptr(unsafe.Pointer(&c.wcmsgs[0])))
		if off != k*cmsgRoom || int(h.Controllen) > cmsgRoom {
			return fmt.Errorf("message %d: control bytes at %d, %d long, outside its room", k, off, h.Controllen)
		}
		cmsgs, err := unix.ParseSocketControlMessage(c.wcmsgs[off : off+int(h.Controllen)])
		if err != nil {
			return fmt.Errorf("message %d: %v", k, err)
		}
		for _, m := range cmsgs {
			v := 0
			switch len(m.Data) {
			case 2:
				v = int(binary.NativeEndian.Uint16(m.Data))
			case 4:
				v = int(binary.NativeEndian.Uint32(m.Data))
			default:
				return fmt.Errorf("message %d: control message of %d bytes", k, len(m.Data))
			}
			switch {
			case m.Header.Level == unix.IPPROTO_UDP && m.Header.Type == unix.UDP_SEGMENT:
				segSize = v
			case !c.ipv6 && m.Header.Level == unix.IPPROTO_IP && m.Header.Type == unix.IP_TTL,
				c.ipv6 && m.Header.Level == unix.IPPROTO_IPV6 && m.Header.Type == unix.IPV6_HOPLIMIT:
				ttl = v
			case !c.ipv6 && m.Header.Level == unix.IPPROTO_IP && m.Header.Type == unix.IP_TOS,
				c.ipv6 && m.Header.Level == unix.IPPROTO_IPV6 && m.Header.Type == unix.IPV6_TCLASS:
				tos = v
			default:
				return fmt.Errorf("message %d: unexpected control message %d/%d", k, m.Header.Level, m.Header.Type)
			}
		}
	}
	step := len(payload)
	if segSize > 0 {
		step = segSize
	}
	for len(payload) > 0 {
		n := min(step, len(payload))
		bc.got = append(bc.got, builtDatagram{b: payload[:n], ttl: ttl, tos: tos, frag: frag})
		payload = payload[n:]
	}
	return nil
}

// innerForBuilder makes an inner packet: IPv4 or IPv6, with the given size, TTL, TOS
// (DSCP and ECN) and, for IPv4, DF.
func innerForBuilder(v6 bool, size int, ttl, tos uint8, df bool) []byte {
	if v6 {
		size = max(size, 40)
		p := make([]byte, size)
		p[0], p[1] = 0x60|tos>>4, tos<<4
		binary.BigEndian.PutUint16(p[4:], uint16(size-40))
		p[6], p[7] = 59, ttl // no next header
		p[8], p[24] = 0x20, 0x20
		return p
	}
	size = max(size, 20)
	p := make([]byte, size)
	p[0], p[1] = 0x45, tos
	binary.BigEndian.PutUint16(p[2:], uint16(size))
	if df {
		p[6] = 0x40
	}
	p[8], p[9] = ttl, 253 // experimental protocol
	p[12], p[16] = 10, 10
	return p
}

// checkBuilder sends pkts through the outbound loop's batching and the carrier's message
// builder, and checks that every packet comes out once, in order, as its own datagram,
// with the TTL and TOS (DSCP) it carried (or the socket's TTL, with cttl), except those
// too big for the path whose senders can be told so (IPv4 with DF, IPv6 above 1280 or
// above what fits); those too big that cannot be refused go out to be fragmented.
func checkBuilder(t testing.TB, ipv6Carrier, gso bool, cttl, pmtu int, pkts [][]byte) {
	t.Helper()
	cfg := testConfig("10.0.0.1", "10.0.0.2")
	cfg.key, cfg.cttl = nil, cttl
	bc := newBuilderCarrier(ipv6Carrier, gso)
	tn := newLink(cfg, newLogger(io.Discard, "t", false), nil, &recordingPort{}, bc, "t", 0).data
	out := &outbound{t: tn, batch: outBatch{arena: make([]byte, outArenaSize)}}
	out.peer = netip.MustParseAddrPort("198.18.0.2:6000")
	if ipv6Carrier {
		out.peer = netip.MustParseAddrPort("[2001:db8::2]:6000")
	}
	if pmtu > 0 {
		out.maxSize = pmtu - bc.c.headerSize()
	}
	var want [][]byte
	var wantFrag []bool
	refused := 0
	for _, p := range pkts {
		fits := out.maxSize == 0 || len(p) <= out.maxSize
		carried := mayFragment(p) || (p[0]>>4 == 6 && len(p) <= minMTUIPv6 && out.maxSize < minMTUIPv6)
		if fits || carried {
			want, wantFrag = append(want, p), append(wantFrag, !fits)
		} else {
			refused++
		}
		out.emit(append([]byte(nil), p...), 0)
	}
	tn.flush(out)
	if bc.err != nil {
		t.Fatal(bc.err)
	}
	if len(bc.got) != len(want) || int(tn.stats.dropTooBig.Load()) != refused {
		t.Fatalf("%d datagrams built, want %d; %d refused as too big, want %d", len(bc.got), len(want),
			tn.stats.dropTooBig.Load(), refused)
	}
	for i, d := range bc.got {
		if string(d.b) != string(want[i]) {
			t.Fatalf("datagram %d is not packet %d (%d bytes, want %d)", i, i, len(d.b), len(want[i]))
		}
		ttl, tos := innerTTLAndTOS(want[i])
		if cttl != 0 {
			ttl = 0
		}
		if d.frag != wantFrag[i] {
			t.Fatalf("datagram %d of %d bytes (path %d): fragmentable %v, want %v", i, len(d.b), out.maxSize, d.frag, wantFrag[i])
		}
		if d.ttl != int(ttl) || d.tos != int(tos) {
			t.Fatalf("datagram %d goes out with TTL %d TOS %#x, its packet has TTL %d TOS %#x (cttl %d)",
				i, d.ttl, d.tos, ttl, tos, cttl)
		}
	}
}

// randomBatch makes n inner packets from r: runs of one size (which GSO groups) with
// TTLs, TOS values (EF, the kernel's 0xc0, ECN bits, zero) and DF drawn at random.
func randomBatch(r *rand.Rand, n int) [][]byte {
	var pkts [][]byte
	toses := []uint8{0, 0, 0xb8, 0xc0, 0x20, 0x01, 0x03, uint8(r.IntN(256))}
	for len(pkts) < n {
		size := 20 + r.IntN(1400)
		if r.IntN(4) == 0 {
			size = 28 + r.IntN(40) // small ones, like pings and ICMP errors
		}
		v6, df := r.IntN(3) == 0, r.IntN(2) == 0
		ttl, tos := uint8(1+r.IntN(255)), toses[r.IntN(len(toses))]
		for run := 1 + r.IntN(8); run > 0 && len(pkts) < n; run-- {
			if r.IntN(5) == 0 {
				ttl, tos = uint8(1+r.IntN(255)), toses[r.IntN(len(toses))]
			}
			pkts = append(pkts, innerForBuilder(v6, size, ttl, tos, df))
		}
	}
	return pkts
}

// TestCarrierMessageBuilder: over random batches (sizes, TTL, TOS, DF, IPv4 and IPv6
// packets, both carrier families, GSO on and off, cttl, a small path), every datagram
// leaves as its own, with its own TTL and TOS. Two or more same-size packets with a TOS
// and a TTL once overran the control-message room of a GSO message (a panic).
func TestCarrierMessageBuilder(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for i := range 400 {
		ipv6, gso := i%2 == 1, i%4 < 2
		cttl, pmtu := 0, 0
		if i%5 == 0 {
			cttl = 64
		}
		if i%7 == 0 {
			pmtu = 576 + r.IntN(900)
		}
		checkBuilder(t, ipv6, gso, cttl, pmtu, randomBatch(r, 1+r.IntN(300)))
	}
	// The case that crashed: two same-size EF-marked packets with their TTLs.
	ping := innerForBuilder(false, 44, 64, 0x20, true)
	checkBuilder(t, false, true, 0, 0, [][]byte{ping, ping, ping})
	checkBuilder(t, true, true, 0, 0, [][]byte{ping, ping})
}

// FuzzCarrierMessageBuilder: any batch the fuzzer describes comes out datagram for
// datagram with its own TTL and TOS.
func FuzzCarrierMessageBuilder(f *testing.F) {
	f.Add([]byte{0x00, 44, 64, 0x20, 44, 64, 0x20}, uint8(0))
	f.Add([]byte{0x81, 200, 1, 0xc0, 200, 1, 0xc0, 13, 255, 0}, uint8(3))
	f.Fuzz(func(t *testing.T, spec []byte, mode uint8) {
		// spec: one mode byte, then per packet three bytes: size/8, TTL, TOS (with bit 0
		// of TOS meaning IPv6 and bit 1 DF).
		if len(spec) < 1 || len(spec) > 3*500 {
			return
		}
		var pkts [][]byte
		for b := spec[1:]; len(b) >= 3; b = b[3:] {
			pkts = append(pkts, innerForBuilder(b[2]&1 != 0, 8*int(b[0]), b[1], b[2]&^3, b[2]&2 != 0))
		}
		cttl, pmtu := 0, 0
		if mode&4 != 0 {
			cttl = 1 + int(spec[0])
		}
		if mode&8 != 0 {
			pmtu = 576 + 4*int(spec[0])
		}
		checkBuilder(t, mode&1 != 0, mode&2 != 0, cttl, pmtu, pkts)
	})
}
