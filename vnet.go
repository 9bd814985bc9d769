package main

// Offloads: the virtio-net header the TUN device puts in front of every packet when it
// runs with IFF_VNET_HDR, segmentation of the super-packets the kernel hands us (TSO and
// USO), and coalescing of received TCP segments into super-packets for the kernel (GRO).
//
// The inner checksum is never computed in software on the fast path. A packet the kernel
// gives us with "checksum not yet computed" (NEEDS_CSUM: its TCP or UDP checksum field
// holds only the pseudo-header sum) travels that way, marked with the data flag
// flagCsumPartial (PROTOCOL.md §4); the receiving ciped hands it to its kernel with
// NEEDS_CSUM again, which completes the checksum if the packet is forwarded and trusts it
// if it is delivered locally. This is safe because the kernel sets NEEDS_CSUM only on
// packets whose data it generated or whose checksum it verified, and the AEAD
// authenticates every byte between the two ciped processes.

import (
	"encoding/binary"
	"errors"
	"math/bits"
	"net/netip"
)

const (
	virtioNetHdrLen = 10 // struct virtio_net_hdr

	virtioFlagNeedsCsum = 1 // VIRTIO_NET_HDR_F_NEEDS_CSUM

	virtioGSONone  = 0 // VIRTIO_NET_HDR_GSO_NONE
	virtioGSOTCPv4 = 1 // VIRTIO_NET_HDR_GSO_TCPV4
	virtioGSOUDPL4 = 5 // VIRTIO_NET_HDR_GSO_UDP_L4
	virtioGSOTCPv6 = 4 // VIRTIO_NET_HDR_GSO_TCPV6

	ipProtoTCP = 6
	ipProtoUDP = 17

	tcpCsumOffset = 16 // checksum field within the TCP header
	udpCsumOffset = 6  // checksum field within the UDP header
	tcpFlagFIN    = 0x01
	tcpFlagSYN    = 0x02
	tcpFlagRST    = 0x04
	tcpFlagPSH    = 0x08
	tcpFlagACK    = 0x10
	tcpFlagURG    = 0x20
	tcpFlagECE    = 0x40
	tcpFlagCWR    = 0x80

	maxSuperPacket = 65535 // largest IP packet, and so the largest coalesced one
	maxRunPackets  = 64    // packets coalesced into one super-packet at most
)

var errBadFrame = errors.New("malformed frame from the interface")

// virtioNetHdr is struct virtio_net_hdr, in the byte order of the host.
type virtioNetHdr struct {
	flags      uint8
	gsoType    uint8
	hdrLen     uint16
	gsoSize    uint16
	csumStart  uint16
	csumOffset uint16
}

func (h *virtioNetHdr) decode(b []byte) {
	h.flags, h.gsoType = b[0], b[1]
	h.hdrLen = binary.NativeEndian.Uint16(b[2:])
	h.gsoSize = binary.NativeEndian.Uint16(b[4:])
	h.csumStart = binary.NativeEndian.Uint16(b[6:])
	h.csumOffset = binary.NativeEndian.Uint16(b[8:])
}

func (h *virtioNetHdr) encode(b []byte) {
	b[0], b[1] = h.flags, h.gsoType
	binary.NativeEndian.PutUint16(b[2:], h.hdrLen)
	binary.NativeEndian.PutUint16(b[4:], h.gsoSize)
	binary.NativeEndian.PutUint16(b[6:], h.csumStart)
	binary.NativeEndian.PutUint16(b[8:], h.csumOffset)
}

// ---------------------------------------------------------------------------------------
// Checksums.

// checksumAdd adds b to a ones'-complement sum kept in 64 bits.
func checksumAdd(sum uint64, b []byte) uint64 {
	var carry uint64
	for len(b) >= 8 {
		sum, carry = bits.Add64(sum, binary.BigEndian.Uint64(b), carry)
		b = b[8:]
	}
	if len(b) >= 4 {
		sum, carry = bits.Add64(sum, uint64(binary.BigEndian.Uint32(b)), carry)
		b = b[4:]
	}
	if len(b) >= 2 {
		sum, carry = bits.Add64(sum, uint64(binary.BigEndian.Uint16(b)), carry)
		b = b[2:]
	}
	if len(b) == 1 {
		sum, carry = bits.Add64(sum, uint64(b[0])<<8, carry)
	}
	return sum + carry
}

// checksumFold folds a 64-bit ones'-complement sum to 16 bits (not inverted).
func checksumFold(sum uint64) uint16 {
	sum = (sum >> 32) + (sum & 0xffffffff)
	sum = (sum >> 32) + (sum & 0xffffffff)
	sum = (sum >> 16) + (sum & 0xffff)
	sum = (sum >> 16) + (sum & 0xffff)
	return uint16(sum)
}

// pseudoHeaderSum is the sum of the TCP/UDP pseudo-header of an IP packet for an L4
// length of l4Len.
func pseudoHeaderSum(pkt []byte, proto uint8, l4Len int) uint64 {
	var sum uint64
	if pkt[0]>>4 == 4 {
		sum = checksumAdd(0, pkt[12:20])
	} else {
		sum = checksumAdd(0, pkt[8:40])
	}
	return sum + uint64(proto) + uint64(l4Len)
}

// setIPv4HeaderChecksum recomputes the header checksum of an IPv4 header of ihl bytes.
func setIPv4HeaderChecksum(ip []byte, ihl int) {
	ip[10], ip[11] = 0, 0
	binary.BigEndian.PutUint16(ip[10:], ^checksumFold(checksumAdd(0, ip[:ihl])))
}

// l4Info locates the transport header of a TCP or UDP packet with no IPv4 fragment
// offset and no IPv6 extension header: it returns the IP header length, the protocol and
// the offset of the checksum field within the transport header. ok is false otherwise.
func l4Info(pkt []byte) (ipHdrLen int, proto uint8, csumOff int, ok bool) {
	switch {
	case len(pkt) >= 20 && pkt[0]>>4 == 4:
		ipHdrLen = int(pkt[0]&0x0f) * 4
		if ipHdrLen < 20 || binary.BigEndian.Uint16(pkt[6:])&0x3fff != 0 { // MF or an offset
			return 0, 0, 0, false
		}
		proto = pkt[9]
	case len(pkt) >= 40 && pkt[0]>>4 == 6:
		ipHdrLen, proto = 40, pkt[6]
	default:
		return 0, 0, 0, false
	}
	switch proto {
	case ipProtoTCP:
		if len(pkt) < ipHdrLen+20 {
			return 0, 0, 0, false
		}
		return ipHdrLen, proto, tcpCsumOffset, true
	case ipProtoUDP:
		if len(pkt) < ipHdrLen+8 {
			return 0, 0, 0, false
		}
		return ipHdrLen, proto, udpCsumOffset, true
	}
	return 0, 0, 0, false
}

// setPartialChecksum stores the pseudo-header sum in the checksum field of a TCP or UDP
// packet: the "not yet computed" state of NEEDS_CSUM.
func setPartialChecksum(pkt []byte, ipHdrLen int, proto uint8, csumOff int) {
	sum := checksumFold(pseudoHeaderSum(pkt, proto, len(pkt)-ipHdrLen))
	binary.BigEndian.PutUint16(pkt[ipHdrLen+csumOff:], sum)
}

// completeChecksum turns a partial checksum (the pseudo-header sum in the field) into the
// full one, in software: for a kernel that cannot take NEEDS_CSUM packets.
func completeChecksum(pkt []byte) bool {
	ipHdrLen, proto, csumOff, ok := l4Info(pkt)
	if !ok {
		return false
	}
	// The field holds the pseudo-header sum: summing the segment with it in place gives
	// pseudo-header + segment.
	sum := ^checksumFold(checksumAdd(0, pkt[ipHdrLen:]))
	if proto == ipProtoUDP && sum == 0 {
		sum = 0xffff
	}
	binary.BigEndian.PutUint16(pkt[ipHdrLen+csumOff:], sum)
	return true
}

// checksumValid reports whether the TCP or UDP checksum of a packet is right.
func checksumValid(pkt []byte) bool {
	ipHdrLen, proto, _, ok := l4Info(pkt)
	if !ok {
		return false
	}
	return checksumFold(checksumAdd(pseudoHeaderSum(pkt, proto, len(pkt)-ipHdrLen), pkt[ipHdrLen:])) == 0xffff
}

// ---------------------------------------------------------------------------------------
// Outbound: split what the kernel gave us into inner packets that fit the tunnel MTU.

// segmenter turns frames read from the TUN device into inner packets. It is owned by the
// outbound loop.
type segmenter struct {
	template [120]byte // the super-packet's IP and transport headers, as read
}

// packetSink receives each inner packet of a frame, in order, with the data flags it
// needs. The packet is valid only during the call; the bytes just before it may be
// overwritten by the next call.
type packetSink interface {
	emit(pkt []byte, flags byte)
}

// split cuts a frame (virtio header h, packet pkt as read from the device) into inner
// packets and hands each to the sink. TSO and USO super-packets are cut into gsoSize pieces
// in place: each piece's headers are written just in front of its payload, over the tail
// of the previous piece, which the sink has already consumed. Checksums are left partial.
func (sg *segmenter) split(h *virtioNetHdr, pkt []byte, sink packetSink) error {
	if h.gsoType == virtioGSONone {
		flags := byte(0)
		if h.flags&virtioFlagNeedsCsum != 0 {
			ipHdrLen, _, csumOff, ok := l4Info(pkt)
			switch {
			case ok && int(h.csumStart) == ipHdrLen && int(h.csumOffset) == csumOff:
				flags = flagCsumPartial
			case int(h.csumStart)+int(h.csumOffset)+2 <= len(pkt) && h.csumStart < uint16(len(pkt)):
				// Something other than plain TCP or UDP: finish it here.
				sum := ^checksumFold(checksumAdd(0, pkt[h.csumStart:]))
				binary.BigEndian.PutUint16(pkt[h.csumStart+h.csumOffset:], sum)
			default:
				return errBadFrame
			}
		}
		sink.emit(pkt, flags)
		return nil
	}
	ipHdrLen, proto, _, ok := l4Info(pkt)
	if !ok || h.gsoSize == 0 || int(h.csumStart) != ipHdrLen {
		return errBadFrame
	}
	var l4HdrLen int
	switch {
	case (h.gsoType == virtioGSOTCPv4 || h.gsoType == virtioGSOTCPv6) && proto == ipProtoTCP:
		l4HdrLen = int(pkt[ipHdrLen+12]>>4) * 4
		if l4HdrLen < 20 {
			return errBadFrame
		}
	case h.gsoType == virtioGSOUDPL4 && proto == ipProtoUDP:
		l4HdrLen = 8
	default:
		return errBadFrame
	}
	hdrLen := ipHdrLen + l4HdrLen
	if hdrLen > len(sg.template) || hdrLen > len(pkt) {
		return errBadFrame
	}
	copy(sg.template[:hdrLen], pkt[:hdrLen])
	tmpl := sg.template[:hdrLen]
	ipv4 := pkt[0]>>4 == 4
	mss := int(h.gsoSize)
	payload := len(pkt) - hdrLen
	var firstSeq uint32
	var firstID uint16
	if ipv4 {
		firstID = binary.BigEndian.Uint16(tmpl[4:])
	}
	tcpFlags := byte(0)
	if proto == ipProtoTCP {
		firstSeq = binary.BigEndian.Uint32(tmpl[ipHdrLen+4:])
		tcpFlags = tmpl[ipHdrLen+13]
	}
	for i, off := 0, 0; off < payload || (i == 0 && payload == 0); i, off = i+1, off+mss {
		end := min(off+mss, payload)
		seg := pkt[off : hdrLen+end] // headers go in front of the payload at hdrLen+off
		if i > 0 {
			copy(seg[:hdrLen], tmpl)
		}
		segLen := len(seg)
		if ipv4 {
			binary.BigEndian.PutUint16(seg[2:], uint16(segLen))
			binary.BigEndian.PutUint16(seg[4:], firstID+uint16(i))
			setIPv4HeaderChecksum(seg, ipHdrLen)
		} else {
			binary.BigEndian.PutUint16(seg[4:], uint16(segLen-40))
		}
		l4 := seg[ipHdrLen:]
		if proto == ipProtoTCP {
			binary.BigEndian.PutUint32(l4[4:], firstSeq+uint32(off))
			f := tcpFlags
			if end < payload {
				f &^= tcpFlagFIN | tcpFlagPSH // only the last piece ends or pushes
			}
			if i > 0 {
				f &^= tcpFlagCWR // only the first piece signals the window reduction
			}
			l4[13] = f
			setPartialChecksum(seg, ipHdrLen, proto, tcpCsumOffset)
		} else {
			binary.BigEndian.PutUint16(l4[4:], uint16(segLen-ipHdrLen))
			setPartialChecksum(seg, ipHdrLen, proto, udpCsumOffset)
		}
		sink.emit(seg, flagCsumPartial)
		if end >= payload {
			break
		}
	}
	return nil
}

// ---------------------------------------------------------------------------------------
// Inbound: coalesce consecutive TCP segments of one flow into one super-packet.

// innerPacket is a received inner packet on its way to the interface.
type innerPacket struct {
	pkt     []byte
	partial bool // its checksum is partial (flagCsumPartial)
}

// tcpRun describes the first packet of a run of coalescible TCP segments.
type tcpRun struct {
	ipHdrLen, hdrLen int
	mss              int
	seq              uint32 // sequence number the next segment must have
	id               uint16 // IPv4 ID the next segment must have
	bytes            int    // total length of the super-packet so far
}

// verifyToPartial checks the complete checksum of a TCP packet and, if it is right,
// turns it into a partial one, so that the packet can join a coalesced run (as Linux GRO
// does with packets it verified). It reports whether the packet is now partial.
func verifyToPartial(p *innerPacket) bool {
	if p.partial {
		return true
	}
	if !checksumValid(p.pkt) {
		return false
	}
	ipHdrLen, proto, csumOff, _ := l4Info(p.pkt)
	setPartialChecksum(p.pkt, ipHdrLen, proto, csumOff)
	p.partial = true
	return true
}

// startRun reports whether p can begin a coalesced run and describes it.
func startRun(p *innerPacket) (tcpRun, bool) {
	ipHdrLen, proto, _, ok := l4Info(p.pkt)
	if !ok || proto != ipProtoTCP {
		return tcpRun{}, false
	}
	pkt := p.pkt
	if pkt[0]>>4 == 4 && ipHdrLen != 20 { // no IPv4 options
		return tcpRun{}, false
	}
	tcp := pkt[ipHdrLen:]
	thl := int(tcp[12]>>4) * 4
	hdrLen := ipHdrLen + thl
	if thl < 20 || hdrLen >= len(pkt) || tcp[13] != tcpFlagACK && tcp[13] != tcpFlagACK|tcpFlagPSH {
		return tcpRun{}, false
	}
	if !verifyToPartial(p) {
		return tcpRun{}, false
	}
	r := tcpRun{ipHdrLen: ipHdrLen, hdrLen: hdrLen, mss: len(pkt) - hdrLen, bytes: len(pkt)}
	r.seq = binary.BigEndian.Uint32(tcp[4:]) + uint32(r.mss)
	if pkt[0]>>4 == 4 {
		r.id = binary.BigEndian.Uint16(pkt[4:]) + 1
	}
	return r, tcp[13]&tcpFlagPSH == 0 // a pushed segment ends a run
}

// extends reports whether p continues the run begun by first: same flow and headers but
// for lengths, IDs, sequence number and PSH; the next sequence number and ID; a payload of
// the run's segment size (or less, which ends the run).
func (r *tcpRun) extends(first, p *innerPacket) (ok, last bool) {
	a, b := first.pkt, p.pkt
	if len(b) <= r.hdrLen || len(b)-r.hdrLen > r.mss || r.bytes+len(b)-r.hdrLen > maxSuperPacket {
		return false, false
	}
	if a[0]>>4 == 4 {
		// Version and header length, TOS; flags and fragment offset, TTL, protocol;
		// addresses; the next ID.
		if b[0] != a[0] || b[1] != a[1] || string(b[6:10]) != string(a[6:10]) || string(b[12:20]) != string(a[12:20]) ||
			binary.BigEndian.Uint16(b[4:]) != r.id {
			return false, false
		}
	} else if string(b[0:4]) != string(a[0:4]) || string(b[6:40]) != string(a[6:40]) {
		// Version, traffic class, flow label; next header, hop limit, addresses.
		return false, false
	}
	ta, tb := a[r.ipHdrLen:r.hdrLen], b[r.ipHdrLen:r.hdrLen]
	if tb[12] != ta[12] || binary.BigEndian.Uint32(tb[4:]) != r.seq || // header length, sequence
		string(tb[0:4]) != string(ta[0:4]) || string(tb[8:12]) != string(ta[8:12]) || // ports, ack
		tb[13]&^tcpFlagPSH != tcpFlagACK || string(tb[14:16]) != string(ta[14:16]) || // flags, window
		string(tb[18:]) != string(ta[18:]) { // urgent pointer, options (timestamps)
		return false, false
	}
	if !verifyToPartial(p) {
		return false, false
	}
	size := len(b) - r.hdrLen
	r.seq += uint32(size)
	r.id++
	r.bytes += size
	return true, size < r.mss || tb[13]&tcpFlagPSH != 0
}

// nextRun finds the run that begins at pkts[i]: pkts[i:j] become one packet for the
// interface (j == i+1: pkts[i] alone, and run is not used). With coalesce false every
// packet stands alone. A run holds at most maxRunPackets packets, so that one writev
// takes it (virtio header, first packet, the others' payloads); psh says whether its last
// segment had PSH.
func nextRun(pkts []innerPacket, i int, coalesce bool) (j int, run tcpRun, psh bool) {
	j = i + 1
	ok := false
	if coalesce {
		run, ok = startRun(&pkts[i])
	}
	for ok && j < len(pkts) && j-i < maxRunPackets {
		more, last := run.extends(&pkts[i], &pkts[j])
		if !more {
			break
		}
		psh = pkts[j].pkt[run.ipHdrLen+13]&tcpFlagPSH != 0
		j++
		if last {
			break
		}
	}
	return j, run, psh
}

// superHeader rewrites the headers of a run's first packet for the coalesced packet of
// total bytes, PSH set if the last segment had it, and fills the virtio header.
func (r *tcpRun) superHeader(first []byte, total int, psh bool, h *virtioNetHdr) {
	if first[0]>>4 == 4 {
		binary.BigEndian.PutUint16(first[2:], uint16(total))
		setIPv4HeaderChecksum(first, r.ipHdrLen)
		h.gsoType = virtioGSOTCPv4
	} else {
		binary.BigEndian.PutUint16(first[4:], uint16(total-40))
		h.gsoType = virtioGSOTCPv6
	}
	if psh {
		first[r.ipHdrLen+13] |= tcpFlagPSH
	}
	sum := checksumFold(pseudoHeaderSum(first, ipProtoTCP, total-r.ipHdrLen))
	binary.BigEndian.PutUint16(first[r.ipHdrLen+tcpCsumOffset:], sum)
	h.flags = virtioFlagNeedsCsum
	h.hdrLen = uint16(r.hdrLen)
	h.gsoSize = uint16(r.mss)
	h.csumStart = uint16(r.ipHdrLen)
	h.csumOffset = tcpCsumOffset
}

// singleHeader fills the virtio header for one packet written alone.
func singleHeader(p *innerPacket, h *virtioNetHdr) {
	*h = virtioNetHdr{}
	if !p.partial {
		return
	}
	if ipHdrLen, _, csumOff, ok := l4Info(p.pkt); ok {
		h.flags = virtioFlagNeedsCsum
		h.csumStart = uint16(ipHdrLen)
		h.csumOffset = uint16(csumOff)
	}
}

// ---------------------------------------------------------------------------------------
// ICMP "fragmentation needed" / "packet too big".

const icmpTooBigMax = 40 + 8 + 1232 // IPv6 header, ICMPv6 header, quote: 1280 bytes

// icmpTooBig builds, in dst's capacity, the ICMP message a router sends back when pkt
// does not fit a link of mtu bytes: ICMPv4 type 3 code 4 quoting pkt's header and 8
// bytes (RFC 792, RFC 1191), or ICMPv6 type 2 quoting as much of pkt as fits 1280 bytes
// (RFC 4443). It comes from src (the tunnel's far end, the "router" that found the
// packet too big) if src is of pkt's IP version, else from pkt's destination; never from
// one of our own addresses, which the kernel would drop as a martian. It returns nil for
// a packet that must not be answered (ICMP errors, and what is not IP).
func icmpTooBig(dst, pkt []byte, mtu int, src netip.Addr) []byte {
	switch {
	case len(pkt) >= 20 && pkt[0]>>4 == 4:
		ihl := int(pkt[0]&0x0f) * 4
		if ihl < 20 || len(pkt) < ihl || (pkt[9] == 1 && len(pkt) > ihl && pkt[ihl] != 0 && pkt[ihl] != 8) {
			return nil // never answer an ICMP error (only echo request and reply)
		}
		quote := pkt[:min(len(pkt), ihl+8)]
		from := pkt[16:20]
		if src.Is4() {
			a := src.As4()
			from = a[:]
		}
		m := dst[:20+8+len(quote)]
		clear(m[:28])
		m[0], m[8], m[9] = 0x45, 64, 1
		binary.BigEndian.PutUint16(m[2:], uint16(len(m)))
		copy(m[12:16], from)
		copy(m[16:20], pkt[12:16])
		setIPv4HeaderChecksum(m, 20)
		m[20], m[21] = 3, 4
		binary.BigEndian.PutUint16(m[26:], uint16(min(mtu, 0xffff)))
		copy(m[28:], quote)
		binary.BigEndian.PutUint16(m[22:], ^checksumFold(checksumAdd(0, m[20:])))
		return m
	case len(pkt) >= 40 && pkt[0]>>4 == 6:
		if pkt[6] == 58 && len(pkt) > 40 && pkt[40] < 128 {
			return nil // an ICMPv6 error
		}
		quote := pkt[:min(len(pkt), icmpTooBigMax-48)]
		from := pkt[24:40]
		if src.Is6() && !src.Is4In6() {
			a := src.As16()
			from = a[:]
		}
		m := dst[:48+len(quote)]
		clear(m[:48])
		m[0], m[6], m[7] = 0x60, 58, 64
		binary.BigEndian.PutUint16(m[4:], uint16(len(m)-40))
		copy(m[8:24], from)
		copy(m[24:40], pkt[8:24])
		m[40] = 2
		binary.BigEndian.PutUint32(m[44:], uint32(mtu))
		copy(m[48:], quote)
		sum := checksumAdd(checksumAdd(0, m[8:40]), m[40:]) + uint64(len(m)-40) + 58
		binary.BigEndian.PutUint16(m[42:], ^checksumFold(sum))
		return m
	}
	return nil
}
