package main

import (
	"bytes"
	"encoding/binary"
	"io"
	"net/netip"
	"testing"
	"time"
)

// udpFrame builds a USO super-packet (IPv4 or IPv6) of payload bytes.
func udpFrame(v6 bool, payload, segSize int) (virtioNetHdr, []byte) {
	ipHdr := 20
	if v6 {
		ipHdr = 40
	}
	pkt := make([]byte, ipHdr+8+payload)
	if v6 {
		pkt[0], pkt[6], pkt[7] = 0x60, ipProtoUDP, 64
		binary.BigEndian.PutUint16(pkt[4:], uint16(len(pkt)-40))
		pkt[8], pkt[23], pkt[24], pkt[39] = 0xfd, 1, 0xfd, 2
	} else {
		pkt[0], pkt[8], pkt[9] = 0x45, 64, ipProtoUDP
		binary.BigEndian.PutUint16(pkt[2:], uint16(len(pkt)))
		copy(pkt[12:], []byte{10, 0, 0, 1, 10, 0, 0, 2})
		setIPv4HeaderChecksum(pkt, ipHdr)
	}
	binary.BigEndian.PutUint16(pkt[ipHdr:], 5000)
	binary.BigEndian.PutUint16(pkt[ipHdr+2:], 6000)
	for i := ipHdr + 8; i < len(pkt); i++ {
		pkt[i] = byte(i * 7)
	}
	setPartialChecksum(pkt, ipHdr, ipProtoUDP, udpCsumOffset)
	return virtioNetHdr{flags: virtioFlagNeedsCsum, gsoType: virtioGSOUDPL4, hdrLen: uint16(ipHdr + 8),
		gsoSize: uint16(segSize), csumStart: uint16(ipHdr), csumOffset: udpCsumOffset}, pkt
}

// tcp6Frame turns an IPv4 TSO frame into the same one over IPv6.
func tcp6Frame(payload, mss int) (virtioNetHdr, []byte) {
	h4, p4 := tsoFrame(payload, mss)
	pkt := make([]byte, 40+len(p4)-20)
	pkt[0], pkt[6], pkt[7] = 0x60, ipProtoTCP, 64
	binary.BigEndian.PutUint16(pkt[4:], uint16(len(pkt)-40))
	pkt[8], pkt[23], pkt[24], pkt[39] = 0xfd, 1, 0xfd, 2
	copy(pkt[40:], p4[20:])
	setPartialChecksum(pkt, 40, ipProtoTCP, tcpCsumOffset)
	h4.gsoType, h4.hdrLen, h4.csumStart = virtioGSOTCPv6, h4.hdrLen+20, 40
	return h4, pkt
}

// checkSegments checks what the segmenter made of a frame: valid packets of at most
// gsoSize payload, partial checksums that complete to valid ones, consecutive sequence
// numbers (TCP) and IDs (IPv4), PSH only at the end, and the frame's payload, in order.
func checkSegments(t *testing.T, h virtioNetHdr, orig []byte, segs [][]byte) {
	t.Helper()
	ipHdrLen, proto, _, ok := l4Info(orig)
	if !ok {
		t.Fatal("bad frame")
	}
	l4Len := 8
	if proto == ipProtoTCP {
		l4Len = int(orig[ipHdrLen+12]>>4) * 4
	}
	hdrLen := ipHdrLen + l4Len
	want := (len(orig) - hdrLen + int(h.gsoSize) - 1) / int(h.gsoSize)
	if len(segs) != want {
		t.Fatalf("%d segments, want %d", len(segs), want)
	}
	var payload []byte
	for i, s := range segs {
		if !innerPacketOK(s) {
			t.Fatalf("segment %d is not a well-formed IP packet", i)
		}
		if len(s)-hdrLen > int(h.gsoSize) || (i < len(segs)-1 && len(s)-hdrLen != int(h.gsoSize)) {
			t.Fatalf("segment %d carries %d bytes, gso size %d", i, len(s)-hdrLen, h.gsoSize)
		}
		c := bytes.Clone(s)
		if !completeChecksum(c) || !checksumValid(c) {
			t.Fatalf("segment %d: the partial checksum does not complete to a valid one", i)
		}
		if s[0]>>4 == 4 {
			if checksumFold(checksumAdd(0, s[:ipHdrLen])) != 0xffff {
				t.Fatalf("segment %d: bad IPv4 header checksum", i)
			}
			if id := binary.BigEndian.Uint16(s[4:]); id != binary.BigEndian.Uint16(orig[4:])+uint16(i) {
				t.Fatalf("segment %d: IP ID %d", i, id)
			}
		}
		if proto == ipProtoTCP {
			seq := binary.BigEndian.Uint32(s[ipHdrLen+4:])
			if seq != binary.BigEndian.Uint32(orig[ipHdrLen+4:])+uint32(len(payload)) {
				t.Fatalf("segment %d: sequence number %d", i, seq)
			}
			if psh := s[ipHdrLen+13]&tcpFlagPSH != 0; psh != (i == len(segs)-1) {
				t.Fatalf("segment %d of %d: PSH %v", i, len(segs), psh)
			}
		} else if int(binary.BigEndian.Uint16(s[ipHdrLen+4:])) != len(s)-ipHdrLen {
			t.Fatalf("segment %d: UDP length field", i)
		}
		payload = append(payload, s[hdrLen:]...)
	}
	if !bytes.Equal(payload, orig[hdrLen:]) {
		t.Fatal("the segments' payloads are not the frame's payload")
	}
}

func TestSegment(t *testing.T) {
	for _, c := range []struct {
		name  string
		frame func() (virtioNetHdr, []byte)
	}{
		{"TCPv4 64 KiB", func() (virtioNetHdr, []byte) { return tsoFrame(65535-52, 1388) }},
		{"TCPv4 exact multiple", func() (virtioNetHdr, []byte) { return tsoFrame(1388*10, 1388) }},
		{"TCPv4 one byte over", func() (virtioNetHdr, []byte) { return tsoFrame(1388*3+1, 1388) }},
		{"TCPv4 small mss", func() (virtioNetHdr, []byte) { return tsoFrame(9000, 536) }},
		{"TCPv6", func() (virtioNetHdr, []byte) { return tcp6Frame(30000, 1368) }},
		{"UDPv4", func() (virtioNetHdr, []byte) { return udpFrame(false, 20000, 1400) }},
		{"UDPv6", func() (virtioNetHdr, []byte) { return udpFrame(true, 5000, 1200) }},
	} {
		t.Run(c.name, func(t *testing.T) {
			h, frame := c.frame()
			orig := bytes.Clone(frame)
			sink := &collectSink{}
			var sg segmenter
			if err := sg.split(&h, frame, sink); err != nil {
				t.Fatal(err)
			}
			checkSegments(t, h, orig, sink.pkts)
		})
	}
}

func TestSegmentSinglePackets(t *testing.T) {
	_, tcp := tsoFrame(100, 1388)
	binary.BigEndian.PutUint16(tcp[2:], uint16(len(tcp)))
	setIPv4HeaderChecksum(tcp, 20)
	for _, c := range []struct {
		name      string
		h         virtioNetHdr
		wantFlags byte
	}{
		{"checksum already complete", virtioNetHdr{}, 0},
		{"checksum partial", virtioNetHdr{flags: virtioFlagNeedsCsum, csumStart: 20, csumOffset: tcpCsumOffset}, flagCsumPartial},
	} {
		sink := &flagSink{}
		var sg segmenter
		if err := sg.split(&c.h, bytes.Clone(tcp), sink); err != nil || len(sink.flags) != 1 || sink.flags[0] != c.wantFlags {
			t.Errorf("%s: %v, flags %v", c.name, err, sink.flags)
		}
	}
	// NEEDS_CSUM on something that is not plain TCP or UDP is finished in software.
	icmp := tuntestPing()
	binary.BigEndian.PutUint16(icmp[22:], 0)
	want := tuntestPing()
	sink := &collectSink{}
	var sg segmenter
	h := virtioNetHdr{flags: virtioFlagNeedsCsum, csumStart: 20, csumOffset: 2}
	if err := sg.split(&h, icmp, sink); err != nil || len(sink.pkts) != 1 || !bytes.Equal(sink.pkts[0], want) {
		t.Errorf("ICMP with NEEDS_CSUM: %v, %x, want %x", err, sink.pkts, want)
	}
}

type flagSink struct{ flags []byte }

func (f *flagSink) emit(pkt []byte, flags byte) { f.flags = append(f.flags, flags) }

// tuntestPing is an ICMP echo with a valid checksum.
func tuntestPing() []byte {
	p := numberedPing("10.0.0.1", "10.0.0.2", 7)
	binary.BigEndian.PutUint16(p[22:], 0)
	binary.BigEndian.PutUint16(p[22:], ^checksumFold(checksumAdd(0, p[20:])))
	return p
}

// segmentPartial cuts frame as the sender would and returns the pieces as the receiver
// gets them: packets with partial checksums.
func segmentPartial(tb testing.TB, h virtioNetHdr, frame []byte) []innerPacket {
	sink := &collectSink{}
	var sg segmenter
	if err := sg.split(&h, frame, sink); err != nil {
		tb.Fatal(err)
	}
	pkts := make([]innerPacket, len(sink.pkts))
	for i, p := range sink.pkts {
		pkts[i] = innerPacket{pkt: p, partial: true}
	}
	return pkts
}

// coalesce runs the inbound coalescing over pkts and returns the packets the kernel
// would get: super-packets (concatenated as writev would) and single packets.
func coalesce(pkts []innerPacket) (out [][]byte, hdrs []virtioNetHdr) {
	for i := 0; i < len(pkts); {
		first := &pkts[i]
		j, run, psh := nextRun(pkts, i, true)
		var h virtioNetHdr
		if j-i == 1 {
			singleHeader(first, &h)
			out = append(out, bytes.Clone(first.pkt))
		} else {
			run.superHeader(first.pkt, run.bytes, psh, &h)
			super := bytes.Clone(first.pkt)
			for k := i + 1; k < j; k++ {
				super = append(super, pkts[k].pkt[run.hdrLen:]...)
			}
			out = append(out, super)
		}
		hdrs = append(hdrs, h)
		i = j
	}
	return out, hdrs
}

// TestCoalesceRoundTrip: a TSO frame cut by the segmenter and coalesced by the receiver
// is the same frame again, with the same virtio header.
func TestCoalesceRoundTrip(t *testing.T) {
	for _, c := range []struct {
		name  string
		frame func() (virtioNetHdr, []byte)
	}{
		{"IPv4", func() (virtioNetHdr, []byte) { return tsoFrame(65535-52, 1388) }},
		{"IPv4 uneven", func() (virtioNetHdr, []byte) { return tsoFrame(1388*7+100, 1388) }},
		{"IPv6", func() (virtioNetHdr, []byte) { return tcp6Frame(40000, 1368) }},
	} {
		t.Run(c.name, func(t *testing.T) {
			h, frame := c.frame()
			orig := bytes.Clone(frame)
			out, hdrs := coalesce(segmentPartial(t, h, frame))
			if len(out) != 1 {
				t.Fatalf("coalesced into %d packets, want 1", len(out))
			}
			if !bytes.Equal(out[0], orig) {
				t.Fatalf("coalesced packet differs from the frame")
			}
			if hdrs[0].gsoType != h.gsoType || hdrs[0].gsoSize != h.gsoSize || hdrs[0].csumStart != h.csumStart ||
				hdrs[0].csumOffset != h.csumOffset || hdrs[0].hdrLen != h.hdrLen || hdrs[0].flags != virtioFlagNeedsCsum {
				t.Fatalf("virtio header %+v, the frame had %+v", hdrs[0], h)
			}
		})
	}
}

// TestCoalesceRefuses: what must not be merged stays apart.
func TestCoalesceRefuses(t *testing.T) {
	segments := func() []innerPacket {
		h, frame := tsoFrame(1388*4, 1388)
		return segmentPartial(t, h, frame)
	}
	for _, c := range []struct {
		name   string
		mutate func(p []innerPacket)
		want   int // packets after coalescing
	}{
		{"all fine", func(p []innerPacket) {}, 1},
		{"complete checksum, verified", func(p []innerPacket) { completeChecksum(p[2].pkt); p[2].partial = false }, 1},
		{"complete checksum, wrong", func(p []innerPacket) {
			completeChecksum(p[2].pkt)
			p[2].pkt[len(p[2].pkt)-1]++
			p[2].partial = false
		}, 3},
		{"all complete", func(p []innerPacket) {
			for i := range p {
				completeChecksum(p[i].pkt)
				p[i].partial = false
			}
		}, 1},
		{"sequence gap", func(p []innerPacket) { p[2].pkt[20+7]++ }, 3},
		{"other port", func(p []innerPacket) { p[2].pkt[20+1]++ }, 3},
		{"IP ID gap", func(p []innerPacket) { p[2].pkt[5]++ }, 3},
		{"TTL", func(p []innerPacket) { p[1].pkt[8]-- }, 3},
		{"TOS", func(p []innerPacket) { p[1].pkt[1] = 0xb8 }, 3},
		{"timestamp", func(p []innerPacket) { p[3].pkt[20+31]++ }, 2},
		{"ack", func(p []innerPacket) { p[1].pkt[20+11]++ }, 3},
		{"FIN", func(p []innerPacket) { p[2].pkt[20+13] |= tcpFlagFIN }, 3},
		{"PSH in the middle ends the run", func(p []innerPacket) { p[1].pkt[20+13] |= tcpFlagPSH }, 2},
		{"PSH first", func(p []innerPacket) { p[0].pkt[20+13] |= tcpFlagPSH }, 2},
		{"short segment in the middle", func(p []innerPacket) {
			p[1].pkt = p[1].pkt[:len(p[1].pkt)-100]
			binary.BigEndian.PutUint16(p[1].pkt[2:], uint16(len(p[1].pkt)))
		}, 2},
	} {
		pkts := segments()
		c.mutate(pkts)
		if out, _ := coalesce(pkts); len(out) != c.want {
			t.Errorf("%s: %d packets, want %d", c.name, len(out), c.want)
		}
	}
}

// FuzzSegment: no frame from the interface panics the segmenter, and everything it emits
// is a well-formed packet whose partial checksum completes.
func FuzzSegment(f *testing.F) {
	for _, fr := range []func() (virtioNetHdr, []byte){
		func() (virtioNetHdr, []byte) { return tsoFrame(5000, 1388) },
		func() (virtioNetHdr, []byte) { return udpFrame(false, 3000, 1000) },
		func() (virtioNetHdr, []byte) { return tcp6Frame(3000, 1200) },
	} {
		h, p := fr()
		var hb [virtioNetHdrLen]byte
		h.encode(hb[:])
		f.Add(append(hb[:], p...))
	}
	f.Fuzz(func(t *testing.T, frame []byte) {
		if len(frame) < virtioNetHdrLen || len(frame) > vnetFrameSize {
			return
		}
		var h virtioNetHdr
		h.decode(frame)
		sink := &collectSink{}
		var sg segmenter
		if sg.split(&h, frame[virtioNetHdrLen:], sink) != nil || h.gsoType == virtioGSONone {
			return
		}
		for _, p := range sink.pkts {
			if len(p) > maxSuperPacket {
				t.Fatalf("emitted %d bytes", len(p))
			}
			if !completeChecksum(bytes.Clone(p)) {
				t.Fatalf("emitted a segment that is not TCP or UDP: %x", p)
			}
		}
	})
}

// FuzzCoalesce: whatever packets arrive (decrypted, from the peer), coalescing does not
// panic, and every super-packet it builds is cut back by the segmenter into exactly the
// packets it was made of.
func FuzzCoalesce(f *testing.F) {
	h, frame := tsoFrame(1388*3+5, 1388)
	sink := &collectSink{}
	var sg segmenter
	if err := sg.split(&h, frame, sink); err != nil {
		f.Fatal(err)
	}
	f.Add(bytes.Join(sink.pkts, nil), uint16(0xffff))
	f.Add(bytes.Join(sink.pkts[:2], nil), uint16(0x0003))
	f.Fuzz(func(t *testing.T, data []byte, partial uint16) {
		// Cut data into packets by their IP length fields.
		var pkts []innerPacket
		for i := 0; len(data) >= 20 && i < 16; i++ {
			n := int(binary.BigEndian.Uint16(data[2:]))
			if data[0]>>4 == 6 && len(data) >= 40 {
				n = int(binary.BigEndian.Uint16(data[4:])) + 40
			}
			if n < 20 || n > len(data) {
				break
			}
			pkts = append(pkts, innerPacket{pkt: bytes.Clone(data[:n]), partial: partial&(1<<i) != 0})
			data = data[n:]
		}
		originals := make([][]byte, len(pkts))
		for i, p := range pkts {
			originals[i] = bytes.Clone(p.pkt)
		}
		out, hdrs := coalesce(pkts)
		k := 0
		for i, super := range out {
			if hdrs[i].gsoType == virtioGSONone {
				k++
				continue
			}
			cut := &collectSink{}
			var sg segmenter
			if err := sg.split(&hdrs[i], bytes.Clone(super), cut); err != nil {
				t.Fatalf("a coalesced packet does not cut: %v", err)
			}
			for _, p := range cut.pkts {
				o := bytes.Clone(originals[k])
				if o[0]>>4 == 4 {
					setIPv4HeaderChecksum(o, int(o[0]&0x0f)*4)
				}
				ipHdrLen, proto, csumOff, _ := l4Info(o)
				setPartialChecksum(o, ipHdrLen, proto, csumOff)
				if !bytes.Equal(p, o) {
					t.Fatalf("packet %d came back as\n%x\nwas\n%x", k, p, o)
				}
				k++
			}
		}
		if k != len(originals) {
			t.Fatalf("%d packets came back of %d", k, len(originals))
		}
	})
}

// sinkCarrier is a carrier that keeps what is sent through it.
type sinkCarrier struct {
	datagrams int
	bytes     int
	batches   int
}

func (c *sinkCarrier) ReadBatch([]carrierMsg) (int, error) { select {} }
func (c *sinkCarrier) WriteBatch(msgs []carrierMsg, to netip.AddrPort) error {
	c.batches++
	for _, m := range msgs {
		n := 1
		if m.segSize > 0 {
			n = (len(m.buf) + m.segSize - 1) / m.segSize
		}
		c.datagrams += n
		c.bytes += len(m.buf)
	}
	return nil
}
func (c *sinkCarrier) receiveBufferSize(n int) int { return n }
func (c *sinkCarrier) LocalAddr() netip.AddrPort   { return netip.AddrPort{} }
func (c *sinkCarrier) Close() error                { return nil }

// TestSendFramesLargerThanTheArena: a frame that makes more datagrams than the send arena
// holds (a tiny segment size) is sent in several batches, completely.
func TestSendFramesLargerThanTheArena(t *testing.T) {
	h, frame := tsoFrame(60000, 16)
	cfg := testConfig("10.0.0.1", "10.0.0.2")
	cfg.peer = netip.MustParseAddrPort("198.18.0.2:6000")
	sink := &sinkCarrier{}
	tn := newLink(cfg, newLogger(io.Discard, "t", false), nil, nil, sink, "t", 0).data
	si, _ := katSessions(t, cipherAES256GCM, 1, 2, 0)
	si.created = time.Now()
	tn.keys.rotate(si)
	out := &outbound{t: tn, batch: outBatch{arena: make([]byte, outArenaSize)}}
	tn.sendFrames([]tunFrame{{hdr: h, pkt: frame}}, out)
	if want := 60000 / 16; sink.datagrams != want || sink.batches < 2 {
		t.Fatalf("%d datagrams in %d batches, want %d in several", sink.datagrams, sink.batches, want)
	}
	if tn.stats.txPackets.Load() != uint64(sink.datagrams) {
		t.Fatalf("counted %d packets", tn.stats.txPackets.Load())
	}
}

// TestParallelSealAndOpen: a large batch sealed by two cores gives byte for byte the
// datagrams the one-core loop gives, in the same order; and opened by two cores, the same
// inner packets come out, in order.
func TestParallelSealAndOpen(t *testing.T) {
	h, tmpl := tsoFrame(65535-52, 1388)
	si, _ := katSessions(t, cipherAES256GCM, 1, 2, 0)
	tn := newLink(testConfig("10.0.0.1", "10.0.0.2"), newLogger(io.Discard, "t", false), nil, nil, &sinkCarrier{}, "t", 0).data
	seal := func(parallel bool) []carrierMsg {
		out := &outbound{t: tn, batch: outBatch{arena: make([]byte, outArenaSize)}, session: si, parallel: parallel}
		if parallel {
			out.helper = newCryptoHelper(out.sealJobs)
			defer out.helper.stop()
		}
		if err := out.seg.split(&h, bytes.Clone(tmpl), out); err != nil {
			t.Fatal(err)
		}
		if len(out.jobs) > 0 {
			out.sealPending()
		}
		return out.batch.msgs
	}
	plain, par := seal(false), seal(true)
	if len(plain) != len(par) {
		t.Fatalf("%d messages sealed on one core, %d on two", len(plain), len(par))
	}
	for i := range plain {
		if !bytes.Equal(plain[i].buf, par[i].buf) || plain[i].segSize != par[i].segSize {
			t.Fatalf("message %d differs between one core and two", i)
		}
	}
	// Open them: one core, then two.
	var want [][]byte
	for _, parallel := range []bool{false, true} {
		in := &inbound{t: tn, jobs: make([]openJob, 0, 128)}
		tn.keys.clear()
		_, fresh := katSessions(t, cipherAES256GCM, 1, 2, 0) // the same keys, a fresh replay window
		fresh.created = time.Now()
		tn.keys.rotate(fresh)
		if parallel {
			in.helper = newCryptoHelper(in.openJobs)
			defer in.helper.stop()
		}
		msgs := make([]carrierMsg, len(par))
		for i, m := range par {
			msgs[i] = carrierMsg{buf: bytes.Clone(m.buf), n: len(m.buf), segSize: m.segSize}
		}
		pkts := in.receive(msgs, nil)
		if len(pkts) != 48 {
			t.Fatalf("parallel=%v: %d inner packets, want 48", parallel, len(pkts))
		}
		if !parallel {
			for _, p := range pkts {
				want = append(want, bytes.Clone(p.pkt))
			}
			continue
		}
		for i, p := range pkts {
			if !bytes.Equal(p.pkt, want[i]) {
				t.Fatalf("inner packet %d differs between one core and two", i)
			}
		}
	}
}

// TestICMPTooBig checks the messages sent back for packets that do not fit: well-formed
// with valid checksums, from our tunnel address, quoting the packet, naming the MTU; and
// none for ICMP errors.
func TestICMPTooBig(t *testing.T) {
	_, tcp4 := tsoFrame(1400, 1388)
	m := icmpTooBig(make([]byte, 0, icmpTooBigMax), tcp4, 1240, netip.MustParseAddr("10.0.0.9"))
	if len(m) != 20+8+20+8 || checksumFold(checksumAdd(0, m[:20])) != 0xffff ||
		checksumFold(checksumAdd(0, m[20:])) != 0xffff {
		t.Fatalf("ICMPv4 message %x: bad length or checksum", m)
	}
	if m[9] != 1 || m[20] != 3 || m[21] != 4 || binary.BigEndian.Uint16(m[26:]) != 1240 ||
		!bytes.Equal(m[12:16], []byte{10, 0, 0, 9}) || !bytes.Equal(m[16:20], tcp4[12:16]) ||
		!bytes.Equal(m[28:], tcp4[:28]) {
		t.Fatalf("ICMPv4 message %x: wrong fields", m)
	}
	_, tcp6 := tcp6Frame(1400, 1368)
	m = icmpTooBig(make([]byte, 0, icmpTooBigMax), tcp6, 1280, netip.MustParseAddr("fd00::9"))
	sum := checksumAdd(checksumAdd(0, m[8:40]), m[40:]) + uint64(len(m)-40) + 58
	if len(m) != icmpTooBigMax || checksumFold(sum) != 0xffff || m[6] != 58 || m[40] != 2 ||
		binary.BigEndian.Uint32(m[44:]) != 1280 || !bytes.Equal(m[24:40], tcp6[8:24]) || !bytes.Equal(m[48:], tcp6[:icmpTooBigMax-48]) {
		t.Fatalf("ICMPv6 message: wrong fields or checksum")
	}
	// The source falls back to the packet's destination when ptpaddr is of the other version.
	m = icmpTooBig(make([]byte, 0, icmpTooBigMax), tcp4, 1240, netip.MustParseAddr("fd00::9"))
	if !bytes.Equal(m[12:16], tcp4[16:20]) {
		t.Fatalf("source %v, want the packet's destination", m[12:16])
	}
	// An ICMP error is never answered; an echo request is.
	unreachable := tuntestPing()
	unreachable[20] = 3
	if icmpTooBig(make([]byte, 0, icmpTooBigMax), unreachable, 1240, netip.Addr{}) != nil {
		t.Fatal("answered an ICMP error")
	}
	if icmpTooBig(make([]byte, 0, icmpTooBigMax), tuntestPing(), 1240, netip.Addr{}) == nil {
		t.Fatal("did not answer an echo request")
	}
}
