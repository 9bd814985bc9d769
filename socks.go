package main

// SOCKS5 (RFC 1928): reaching the peer through a proxy's UDP relay. A TCP control
// connection asks for an association (UDP ASSOCIATE, no authentication); while it stays
// open, datagrams sent to the relay with a SOCKS UDP header naming the peer are passed
// on, and the peer's come back with a header naming it. When the control connection
// drops, the association is asked for again.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"
)

const (
	socksVersion         = 5
	socksMethodNone      = 0    // no authentication
	socksMethodRefused   = 0xff // no acceptable method
	socksCmdUDPAssociate = 3
	socksAtypIPv4        = 1
	socksAtypDomain      = 3
	socksAtypIPv6        = 4
	socksUDPHeaderIPv4   = 10 // RSV (2), FRAG, ATYP, 4-byte address, port
	socksUDPHeaderIPv6   = 22 // RSV (2), FRAG, ATYP, 16-byte address, port
	socksDialTimeout     = 10 * time.Second
	socksMaxRetry        = 30 * time.Second // longest wait between attempts to associate again
)

var errNoAssociation = errors.New("no SOCKS association (the proxy is being asked again)")

// socksReplyText names a SOCKS5 reply code (RFC 1928 §6).
func socksReplyText(code byte) string {
	switch code {
	case 1:
		return "general SOCKS server failure"
	case 2:
		return "connection not allowed by ruleset"
	case 3:
		return "network unreachable"
	case 4:
		return "host unreachable"
	case 5:
		return "connection refused"
	case 6:
		return "TTL expired"
	case 7:
		return "command not supported (the proxy does not relay UDP)"
	case 8:
		return "address type not supported"
	}
	return fmt.Sprintf("reply code %d", code)
}

// socksHeaderSize is the size of a SOCKS UDP header for an address of a's version.
func socksHeaderSize(a netip.Addr) int {
	if a.Is4() {
		return socksUDPHeaderIPv4
	}
	return socksUDPHeaderIPv6
}

// putSocksAddr appends ATYP, address and port.
func putSocksAddr(b []byte, a netip.AddrPort) []byte {
	if a.Addr().Is4() {
		b = append(b, socksAtypIPv4)
	} else {
		b = append(b, socksAtypIPv6)
	}
	b = append(b, a.Addr().AsSlice()...)
	return binary.BigEndian.AppendUint16(b, a.Port())
}

// readSocksAddr reads ATYP, address and port from r (in a reply to a request).
func readSocksAddr(r io.Reader) (netip.AddrPort, error) {
	var atyp [1]byte
	if _, err := io.ReadFull(r, atyp[:]); err != nil {
		return netip.AddrPort{}, err
	}
	var addr []byte
	switch atyp[0] {
	case socksAtypIPv4:
		addr = make([]byte, 4)
	case socksAtypIPv6:
		addr = make([]byte, 16)
	case socksAtypDomain:
		return netip.AddrPort{}, errors.New("the proxy named its relay by host name, which is not supported")
	default:
		return netip.AddrPort{}, fmt.Errorf("unknown address type %d in the proxy's reply", atyp[0])
	}
	var port [2]byte
	if _, err := io.ReadFull(r, addr); err != nil {
		return netip.AddrPort{}, err
	}
	if _, err := io.ReadFull(r, port[:]); err != nil {
		return netip.AddrPort{}, err
	}
	a, _ := netip.AddrFromSlice(addr)
	return netip.AddrPortFrom(a.Unmap(), binary.BigEndian.Uint16(port[:])), nil
}

// parseSocksUDPHeader checks the header of a datagram from the relay (RFC 1928 §7) and
// returns the address it names. Fragments are not supported.
func parseSocksUDPHeader(h []byte) (netip.AddrPort, bool) {
	if len(h) < 4 || h[0] != 0 || h[1] != 0 || h[2] != 0 {
		return netip.AddrPort{}, false
	}
	switch {
	case h[3] == socksAtypIPv4 && len(h) == socksUDPHeaderIPv4:
		return netip.AddrPortFrom(netip.AddrFrom4([4]byte(h[4:8])), binary.BigEndian.Uint16(h[8:])), true
	case h[3] == socksAtypIPv6 && len(h) == socksUDPHeaderIPv6:
		return netip.AddrPortFrom(netip.AddrFrom16([16]byte(h[4:20])).Unmap(), binary.BigEndian.Uint16(h[20:])), true
	}
	return netip.AddrPort{}, false
}

// socksAssociate opens a control connection to the proxy and asks it to relay UDP for
// local (our UDP socket; an unspecified address is replaced by the control
// connection's). It returns the connection, which must stay open, and the relay's
// address.
func socksAssociate(server netip.AddrPort, local netip.AddrPort) (net.Conn, netip.AddrPort, error) {
	c, err := net.DialTimeout("tcp", server.String(), socksDialTimeout)
	if err != nil {
		return nil, netip.AddrPort{}, err
	}
	fail := func(err error) (net.Conn, netip.AddrPort, error) {
		c.Close()
		return nil, netip.AddrPort{}, err
	}
	c.SetDeadline(time.Now().Add(socksDialTimeout))
	if _, err := c.Write([]byte{socksVersion, 1, socksMethodNone}); err != nil {
		return fail(err)
	}
	var reply [2]byte
	if _, err := io.ReadFull(c, reply[:]); err != nil {
		return fail(fmt.Errorf("greeting: %w", err))
	}
	if reply[0] != socksVersion {
		return fail(fmt.Errorf("not a SOCKS5 server (version %d)", reply[0]))
	}
	if reply[1] == socksMethodRefused {
		return fail(errors.New("the proxy wants authentication, which ciped does not do"))
	}
	if reply[1] != socksMethodNone {
		return fail(fmt.Errorf("the proxy chose method %d, which ciped did not offer", reply[1]))
	}
	if local.Addr().IsUnspecified() {
		tcpLocal := c.LocalAddr().(*net.TCPAddr).AddrPort()
		local = netip.AddrPortFrom(tcpLocal.Addr().Unmap(), local.Port())
	}
	req := putSocksAddr([]byte{socksVersion, socksCmdUDPAssociate, 0}, local)
	if _, err := c.Write(req); err != nil {
		return fail(err)
	}
	var head [3]byte
	if _, err := io.ReadFull(c, head[:]); err != nil {
		return fail(fmt.Errorf("UDP ASSOCIATE: %w", err))
	}
	if head[0] != socksVersion || head[1] != 0 {
		return fail(fmt.Errorf("UDP ASSOCIATE refused: %s", socksReplyText(head[1])))
	}
	relay, err := readSocksAddr(c)
	if err != nil {
		return fail(fmt.Errorf("UDP ASSOCIATE: %w", err))
	}
	if relay.Addr().IsUnspecified() {
		relay = netip.AddrPortFrom(server.Addr(), relay.Port())
	}
	c.SetDeadline(time.Time{})
	if tc, ok := c.(*net.TCPConn); ok {
		tc.SetKeepAlive(true)
		tc.SetKeepAlivePeriod(30 * time.Second)
	}
	return c, relay, nil
}

// socksCarrier is a carrier that reaches the peer through a SOCKS5 proxy's UDP relay. It
// wraps a UDP socket without GSO and GRO (each datagram carries its own SOCKS header,
// sent and received as a second iovec, not copied).
type socksCarrier struct {
	udp    *udpCarrier
	server netip.AddrPort
	log    *logger

	relay atomic.Pointer[netip.AddrPort] // nil while there is no association

	mu     sync.Mutex // guards ctrl, closed and the send header cache
	ctrl   net.Conn
	closed bool
	hdrTo  netip.AddrPort
	hdr    []byte

	rhdrs [][]byte // receive headers, one per message; owned by the ReadBatch caller
	done  chan struct{}
}

// newSocksCarrier associates with the proxy (a first failure is returned) and keeps the
// association: when the control connection drops, it asks again, waiting longer between
// attempts up to socksMaxRetry.
func newSocksCarrier(udp *udpCarrier, server netip.AddrPort, peer netip.Addr, batch int, log *logger) (*socksCarrier, error) {
	s := &socksCarrier{udp: udp, server: server, log: log, done: make(chan struct{})}
	s.rhdrs = make([][]byte, batch)
	for i := range s.rhdrs {
		s.rhdrs[i] = make([]byte, socksHeaderSize(peer))
	}
	ctrl, relay, err := socksAssociate(server, udp.LocalAddr())
	if err != nil {
		return nil, fmt.Errorf("SOCKS proxy %s: %w", server, err)
	}
	s.ctrl = ctrl
	s.relay.Store(&relay)
	log.Printf("SOCKS proxy %s relays for us at %s", server, relay)
	go s.routineKeep(ctrl)
	return s, nil
}

// routineKeep waits for the control connection to end and associates again.
func (s *socksCarrier) routineKeep(ctrl net.Conn) {
	defer close(s.done)
	for {
		// Nothing is expected on it: a read returns when it closes or breaks.
		_, err := io.Copy(io.Discard, ctrl)
		s.relay.Store(nil)
		s.mu.Lock()
		closed := s.closed
		s.mu.Unlock()
		if closed {
			return
		}
		if err == nil {
			err = io.EOF
		}
		s.log.Printf("SOCKS proxy %s closed the association (%v): asking again", s.server, err)
		wait := time.Second
		for {
			c, relay, err := socksAssociate(s.server, s.udp.LocalAddr())
			s.mu.Lock()
			if s.closed {
				s.mu.Unlock()
				if c != nil {
					c.Close()
				}
				return
			}
			if err == nil {
				s.ctrl = c
				s.mu.Unlock()
				s.relay.Store(&relay)
				s.log.Printf("SOCKS proxy %s relays for us at %s", s.server, relay)
				ctrl = c
				break
			}
			s.mu.Unlock()
			s.log.Printf("SOCKS proxy %s: %v (again in %v)", s.server, err, wait)
			time.Sleep(wait)
			wait = min(2*wait, socksMaxRetry)
		}
	}
}

// ReadBatch returns the datagrams the relay passed on, with the addresses it names as
// their sources; anything else that reaches the socket is dropped.
func (s *socksCarrier) ReadBatch(msgs []carrierMsg) (int, error) {
	for {
		n, err := s.udp.readBatch(msgs, s.rhdrs)
		if err != nil {
			return 0, s.translate(err)
		}
		relay := s.relay.Load()
		kept := 0
		for i := 0; i < n; i++ {
			from, ok := parseSocksUDPHeader(s.rhdrs[i])
			if msgs[i].n < 0 || !ok || relay == nil || msgs[i].from != *relay {
				continue
			}
			msgs[i].from = from
			msgs[kept], msgs[i] = msgs[i], msgs[kept] // each buffer stays with a message
			kept++
		}
		if kept > 0 {
			return kept, nil
		}
	}
}

func (s *socksCarrier) WriteBatch(msgs []carrierMsg, to netip.AddrPort) error {
	relay := s.relay.Load()
	if relay == nil {
		return errNoAssociation
	}
	s.mu.Lock()
	if s.hdrTo != to || s.hdr == nil {
		s.hdr, s.hdrTo = putSocksAddr([]byte{0, 0, 0}, to), to // new: a batch in flight may hold the old one
	}
	hdr := s.hdr
	s.mu.Unlock()
	// hdr is replaced, never changed in place, so it stays valid for this batch.
	return s.translate(s.udp.writeBatch(msgs, *relay, hdr))
}

// translate makes the socket's reports about datagrams to the relay into reports about
// datagrams to the peer they were for (the relay carries them for it alone): the
// destination is the peer's, the quote loses the SOCKS header.
func (s *socksCarrier) translate(err error) error {
	relay := s.relay.Load()
	s.mu.Lock()
	peer, hdrLen := s.hdrTo, len(s.hdr)
	s.mu.Unlock()
	if err == nil || relay == nil || !peer.IsValid() {
		return err
	}
	forEachError(err, func(e error) {
		ue, ok := e.(*unreachableError)
		if !ok {
			return
		}
		for i := range ue.reports {
			r := &ue.reports[i]
			// This host's own "too big" names no port (the socket is not connected).
			if r.dst != *relay && !(r.kind == reportLocalTooBig && r.dst.Addr() == relay.Addr()) {
				continue
			}
			r.dst = peer
			if r.quoted >= hdrLen {
				r.quoted -= hdrLen
				copy(r.quote[:], r.quote[hdrLen:])
			} else {
				r.quoted = 0
			}
		}
	})
	return err
}

func (s *socksCarrier) receiveBufferSize(datagram int) int { return s.udp.receiveBufferSize(datagram) }
func (s *socksCarrier) LocalAddr() netip.AddrPort          { return s.udp.LocalAddr() }

// Close ends the association and closes the socket.
func (s *socksCarrier) Close() error {
	s.mu.Lock()
	s.closed = true
	ctrl := s.ctrl
	s.mu.Unlock()
	ctrl.Close()
	<-s.done
	return s.udp.Close()
}
