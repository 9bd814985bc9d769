package main

// Micro-benchmarks of the data path. Throughput is bytes of inner packets per second;
// every one reports allocations, which must be 0 per operation in steady state.
//
//	go test -run '^$' -bench . -benchmem

import (
	"bytes"
	"encoding/binary"
	"io"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/tun"
)

// tsoFrame builds what a TUN device with offloads hands over for a bulk TCP sender: an
// IPv4 TCP super-packet of payload bytes (with a timestamp option) and its virtio header.
func tsoFrame(payload, mss int) (virtioNetHdr, []byte) {
	const ipHdr, tcpHdr = 20, 32
	pkt := make([]byte, ipHdr+tcpHdr+payload)
	pkt[0], pkt[8], pkt[9] = 0x45, 64, ipProtoTCP
	binary.BigEndian.PutUint16(pkt[2:], uint16(min(len(pkt), 65535)))
	binary.BigEndian.PutUint16(pkt[4:], 0x1234)
	binary.BigEndian.PutUint16(pkt[6:], 0x4000) // DF
	copy(pkt[12:], []byte{10, 0, 0, 1, 10, 0, 0, 2})
	setIPv4HeaderChecksum(pkt, ipHdr)
	tcp := pkt[ipHdr:]
	binary.BigEndian.PutUint16(tcp[0:], 40000)
	binary.BigEndian.PutUint16(tcp[2:], 5201)
	binary.BigEndian.PutUint32(tcp[4:], 1000)
	binary.BigEndian.PutUint32(tcp[8:], 2000)
	tcp[12] = tcpHdr / 4 << 4
	tcp[13] = tcpFlagACK | tcpFlagPSH
	binary.BigEndian.PutUint16(tcp[14:], 512)
	copy(tcp[20:], []byte{1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2}) // NOP NOP timestamps
	for i := ipHdr + tcpHdr; i < len(pkt); i++ {
		pkt[i] = byte(i)
	}
	setPartialChecksum(pkt, ipHdr, ipProtoTCP, tcpCsumOffset)
	h := virtioNetHdr{flags: virtioFlagNeedsCsum, gsoType: virtioGSOTCPv4, hdrLen: ipHdr + tcpHdr,
		gsoSize: uint16(mss), csumStart: ipHdr, csumOffset: tcpCsumOffset}
	return h, pkt
}

func benchSessions(b *testing.B, suite cipherSuite) (si, sr *session) {
	return katSessions(b, suite, 0x11223344, 0x55667788, 0)
}

// BenchmarkSeal seals a batch of 64 packets of 1400 bytes into an arena, as the outbound
// loop does.
func BenchmarkSeal(b *testing.B) {
	for _, suite := range []cipherSuite{cipherAES256GCM, cipherChaCha20Poly1305} {
		b.Run(suite.String(), func(b *testing.B) {
			si, _ := benchSessions(b, suite)
			pkt := make([]byte, 1400)
			arena := make([]byte, 64*(1400+dataOverhead))
			var nonce [12]byte
			b.SetBytes(64 * 1400)
			b.ReportAllocs()
			for b.Loop() {
				for i := 0; i < 64; i++ {
					si.sealTo(arena[i*(1400+dataOverhead):], pkt, 0, uint64(i), &nonce)
				}
			}
		})
	}
}

// BenchmarkOpen opens a batch of 64 sealed packets in place and passes them through the
// replay window, as the inbound loop does. (Restoring the sealed bytes between rounds is
// not timed.)
func BenchmarkOpen(b *testing.B) {
	for _, suite := range []cipherSuite{cipherAES256GCM, cipherChaCha20Poly1305} {
		b.Run(suite.String(), func(b *testing.B) {
			si, sr := benchSessions(b, suite)
			pkt := make([]byte, 1400)
			const stride = 1400 + dataOverhead
			sealed := make([]byte, 64*stride)
			var nonce [12]byte
			for i := 0; i < 64; i++ {
				si.sealTo(sealed[i*stride:], pkt, 0, uint64(i), &nonce)
			}
			work := make([]byte, len(sealed))
			b.SetBytes(64 * 1400)
			b.ReportAllocs()
			for b.Loop() {
				b.StopTimer()
				copy(work, sealed)
				sr.replay.Reset()
				b.StartTimer()
				for i := 0; i < 64; i++ {
					msg := work[i*stride : (i+1)*stride]
					h, _ := parseDataHeader(msg)
					if _, err := sr.open(msg, h, &nonce); err != nil || !sr.acceptCounter(h.counter) {
						b.Fatal("open failed")
					}
				}
			}
		})
	}
}

// countingSink counts what the segmenter emits.
type countingSink struct{ packets, bytes int }

func (c *countingSink) emit(pkt []byte, flags byte) { c.packets++; c.bytes += len(pkt) }

// BenchmarkSegmentAndSeal cuts a 64 KiB TSO frame into inner packets and seals them into
// the send arena: the outbound loop's work per frame, without system calls.
func BenchmarkSegmentAndSeal(b *testing.B) {
	h, tmpl := tsoFrame(65535-52, 1388)
	frame := make([]byte, len(tmpl))
	si, _ := benchSessions(b, cipherAES256GCM)
	out := &outbound{t: &packetPath{linkCore: &linkCore{cfg: &config{}}}, batch: outBatch{arena: make([]byte, outArenaSize)}, session: si}
	b.SetBytes(int64(len(tmpl)))
	b.ReportAllocs()
	for b.Loop() {
		copy(frame, tmpl) // what the kernel's read does
		out.batch.reset()
		if err := out.seg.split(&h, frame, out); err != nil {
			b.Fatal(err)
		}
	}
	if len(out.batch.msgs) != 2 { // 48 datagrams: one GSO message of 44 and one of 4
		b.Fatalf("%d GSO messages", len(out.batch.msgs))
	}
}

// BenchmarkCoalesce runs the inbound coalescing over the 48 inner packets of one TSO
// frame, as received and opened.
func BenchmarkCoalesce(b *testing.B) {
	h, tmpl := tsoFrame(65535-52, 1388)
	sink := &collectSink{}
	var sg segmenter
	if err := sg.split(&h, tmpl, sink); err != nil {
		b.Fatal(err)
	}
	pkts := make([]innerPacket, len(sink.pkts))
	firstHeaders := bytes.Clone(sink.pkts[0][:h.hdrLen]) // superHeader rewrites them in place
	b.SetBytes(int64(len(tmpl)))
	b.ReportAllocs()
	for b.Loop() {
		copy(sink.pkts[0], firstHeaders)
		for i, p := range sink.pkts {
			pkts[i] = innerPacket{pkt: p, partial: true}
		}
		runs := 0
		for i := 0; i < len(pkts); {
			j, run, psh := nextRun(pkts, i, true)
			if j-i > 1 {
				var vh virtioNetHdr
				run.superHeader(pkts[i].pkt, run.bytes, psh, &vh)
			}
			runs++
			i = j
		}
		if runs != 1 {
			b.Fatalf("%d runs, want 1", runs)
		}
	}
}

// collectSink keeps copies of the emitted packets.
type collectSink struct{ pkts [][]byte }

func (c *collectSink) emit(pkt []byte, flags byte) {
	c.pkts = append(c.pkts, append([]byte(nil), pkt...))
}

// benchPort is a tunPort that hands out copies of one TSO frame as fast as they are
// read, and counts the bytes written, without allocating.
type benchPort struct {
	h       virtioNetHdr
	frame   []byte
	left    atomic.Int64 // frames still to hand out
	issued  atomic.Int64 // frames handed out
	written atomic.Int64 // inner bytes written
	peer    *benchPort   // the receiving side, for a window of frames in flight
	perRead int64        // inner bytes of one frame
	closed  chan struct{}
}

// benchWindow is how many frames may be in flight: loopback UDP drops what the receiver
// cannot take in time.
const benchWindow = 16

func (p *benchPort) newFrameBatch() *frameBatch { return newFrameBatch(vnetReadFrames, vnetFrameSize) }

func (p *benchPort) readsNow() bool { return false }

func (p *benchPort) readNow(fb *frameBatch) error {
	fb.frames = fb.frames[:0]
	return nil
}

func (p *benchPort) read(fb *frameBatch, lock *sync.Mutex) error {
	for {
		select {
		case <-p.closed:
			lock.Lock()
			return io.EOF
		default:
		}
		inFlight := p.issued.Load() - p.peer.written.Load()/p.perRead
		if inFlight < benchWindow && p.left.Add(-1) >= 0 {
			break
		}
		time.Sleep(20 * time.Microsecond)
	}
	p.issued.Add(1)
	lock.Lock()
	n := copy(fb.bufs[0], p.frame)
	fb.frames = append(fb.frames[:0], tunFrame{hdr: p.h, pkt: fb.bufs[0][:n]})
	return nil
}

func (p *benchPort) inject([]byte) error { return nil }

func (p *benchPort) write(pkts []innerPacket) error {
	n := 0
	for i := range pkts {
		n += len(pkts[i].pkt)
	}
	p.written.Add(int64(n))
	return nil
}

// BenchmarkTunnel pushes TSO frames through two tunnels joined by loopback UDP (with GSO
// and GRO where the kernel has them): segmentation, sealing, sendmmsg, recvmmsg, opening,
// the replay window. One operation is one 64 KiB frame; allocs/op counts both tunnels.
func BenchmarkTunnel(b *testing.B) {
	h, frame := tsoFrame(65535-52, 1388)
	ports := [2]*benchPort{{h: h, frame: frame, closed: make(chan struct{})}, {h: h, frame: frame, closed: make(chan struct{})}}
	inner := int64(len(frame) + 47*52) // the payload plus the headers of the 48 inner packets
	ports[0].peer, ports[0].perRead = ports[1], inner
	ports[1].peer, ports[1].perRead = ports[0], inner
	ca, cb := testConfig("10.0.0.1", "10.0.0.2"), testConfig("10.0.0.2", "10.0.0.1")
	// The frames' inner packets (mss 1388) are 1440 bytes: the tunnel MTU of an IPv4
	// carrier. With less, ciped answers them as too big (PROTOCOL.md §4.6), as it should.
	ca.mtu, cb.mtu = 1440, 1440
	var conns [2]*udpCarrier
	for i, c := range []*config{ca, cb} {
		conn, _, err := listenCarrier(c.me, carrierOptions{batch: carrierBatch, gso: true, gro: true})
		if err != nil {
			b.Fatal(err)
		}
		conns[i] = conn
	}
	ca.peer, cb.peer = conns[1].LocalAddr(), conns[0].LocalAddr()
	var tunnels [2]*linkLife
	for i, c := range []*config{ca, cb} {
		dev := &closableTUN{closed: ports[i].closed}
		dev.Events()
		tunnels[i] = newLink(c, newLogger(io.Discard, "bench", false), dev, ports[i], conns[i], "bench", 0)
		tunnels[i].start()
		defer tunnels[i].close()
	}
	for !tunnels[0].up.Load() || !tunnels[1].up.Load() {
		time.Sleep(time.Millisecond)
	}
	b.SetBytes(inner)
	b.ReportAllocs()
	b.ResetTimer()
	ports[0].left.Store(int64(b.N))
	want := int64(b.N) * inner
	deadline := time.Now().Add(time.Minute)
	for ports[1].written.Load() < want && time.Now().Before(deadline) {
		time.Sleep(100 * time.Microsecond)
	}
	b.StopTimer()
	if got := ports[1].written.Load(); got < want {
		b.Fatalf("only %d of %d bytes arrived", got, want)
	}
}

// closableTUN is the tun.Device of BenchmarkTunnel, whose packets go through a
// benchPort: only Close and Events are used.
type closableTUN struct {
	closed chan struct{}
	events chan tun.Event
	once   sync.Once
}

func (d *closableTUN) File() *os.File                         { return nil }
func (d *closableTUN) Read([][]byte, []int, int) (int, error) { return 0, io.EOF }
func (d *closableTUN) Write([][]byte, int) (int, error)       { return 0, io.EOF }
func (d *closableTUN) MTU() (int, error)                      { return 1440, nil }
func (d *closableTUN) Name() (string, error)                  { return "bench", nil }
func (d *closableTUN) BatchSize() int                         { return 1 }
func (d *closableTUN) Events() <-chan tun.Event {
	d.once.Do(func() { d.events = make(chan tun.Event) })
	return d.events
}
func (d *closableTUN) Close() error {
	d.Events()
	close(d.closed)
	close(d.events)
	return nil
}
