package main

// The carrier: one UDP socket, read and written in batches with recvmmsg(2) and
// sendmmsg(2) through the Go netpoller, without allocating per packet. With UDP GSO a
// message of the batch carries many datagrams of one size, which the kernel splits (or
// hands to the NIC) late; with UDP GRO one received message holds many datagrams.
//
// Every datagram leaves with DF (IPv4) and unfragmented, whatever the kernel's route
// cache believes of the path (IP_PMTUDISC_PROBE): how large a datagram may be is the
// link's decision, from authenticated probes (pmtu.go). Only datagrams marked to be
// fragmented go out without DF, for the kernel to cut. The network's ICMP reports about
// our datagrams are read from the socket's error queue and handed up as they are, with
// the destination and the first bytes of the datagram they quote: judging them is the
// link's business.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

const (
	carrierSocketBuffer = 4 << 20 // bytes of kernel socket buffer in each direction
	maxGSOSegments      = 64      // datagrams per GSO message (the kernel takes up to 64 or 128)
	maxGSOBytes         = 65000   // bytes per GSO message (under the 64 KiB of one IP packet)
	groBufferSize       = 65536   // receive buffer per message when GRO is on
	writeSlots          = 1024    // mmsghdrs for one sendmmsg (GSO messages split when GSO is off)
	receiveNowBatch     = 4       // messages per recvmmsg of readNow (the answer watch's)
)

// cmsgRoom is the room for one message's control data: the most putCmsgs writes (TTL,
// TOS and the GSO segment size, each in its own aligned cmsghdr), and more than the
// UDP_GRO a received message carries.
var cmsgRoom = 2*unix.CmsgSpace(4) + unix.CmsgSpace(2)

// carrierMsg is one message of a batch: a datagram, or with segSize > 0 a run of
// datagrams of segSize bytes each (the last may be shorter) sent or received as one.
type carrierMsg struct {
	buf     []byte         // receive: room for the message; send: the datagrams
	n       int            // receive: size of the message
	segSize int            // size of each datagram in buf; 0: buf is one datagram
	from    netip.AddrPort // receive: where it came from
	ttl     uint8          // send: TTL / hop limit of the carrier packets; 0: the socket's
	tos     uint8          // send: TOS / traffic class of the carrier packets
	frag    bool           // send: may be fragmented on the way (one datagram, no GSO)
}

// carrier is the packet socket the tunnel talks through. ReadBatch is called by one
// goroutine at a time; WriteBatch may be called concurrently with itself and ReadBatch.
type carrier interface {
	// ReadBatch blocks until at least one datagram arrives, then fills msgs[:n]. An
	// *unreachableError reports ICMP errors for datagrams sent earlier; n is then 0.
	ReadBatch(msgs []carrierMsg) (n int, err error)
	// WriteBatch sends every message to the address. After trying all of them it returns
	// the errors joined; ICMP errors reported on the way come as an *unreachableError.
	WriteBatch(msgs []carrierMsg, to netip.AddrPort) error
	// receiveBufferSize is the size ReadBatch's buffers need for datagrams of up to
	// datagram bytes (more with GRO).
	receiveBufferSize(datagram int) int
	LocalAddr() netip.AddrPort
	Close() error
}

// reportKind is what an error-queue entry reports.
type reportKind uint8

const (
	reportUnreachable reportKind = iota // port, host or network unreachable, and the like
	reportTooBig                        // ICMP "fragmentation needed" / "packet too big", with a size
	reportLocalTooBig                   // our own kernel: larger than the interface takes
)

// carrierReport is one error-queue entry: what the network (or our own kernel) said
// about a datagram we sent. Nothing in it is authenticated, but the kernel matched it to
// this socket, and it names where the datagram was going.
type carrierReport struct {
	kind   reportKind
	dst    netip.AddrPort // where the reported datagram was going
	mtu    int            // reportTooBig, reportLocalTooBig: the largest IP packet said to fit
	quote  [quoteKept]byte
	quoted int // how many bytes of the datagram's payload the report quotes (quote holds the first)
}

const (
	quoteKept       = 32 // bytes of a quoted datagram kept: a ciped header, behind a SOCKS one
	reportsKept     = 16 // error-queue entries kept per drain; more are only counted
	errorQueueDrain = 64 // entries read per drain at most
)

// unreachableError says that the kernel reported errors for datagrams sent earlier:
// count entries in its error queue, the first of them kept in reports. Who they concern
// is the link's to judge.
type unreachableError struct {
	count   int
	reports []carrierReport
	err     error // the error the system call returned
}

func (e *unreachableError) Error() string {
	return fmt.Sprintf("%d datagrams reported undeliverable (last: %v)", e.count, e.err)
}

// forEachError calls fn for each error joined in err (errors.Join), however deeply, and
// for err itself if it joins none.
func forEachError(err error, fn func(error)) {
	if joined, ok := err.(interface{ Unwrap() []error }); ok {
		for _, e := range joined.Unwrap() {
			forEachError(e, fn)
		}
		return
	}
	if err != nil {
		fn(err)
	}
}

// gsoFallbackError reports that the kernel refused a GSO send: GSO is off from now on and
// the datagrams went out one by one.
type gsoFallbackError struct{ err error }

func (e *gsoFallbackError) Error() string {
	return fmt.Sprintf("UDP GSO send failed (%v): sending datagrams one by one from now on", e.err)
}

// icmpErrno reports whether a socket error is the report of an ICMP error.
func icmpErrno(e syscall.Errno) bool {
	switch e {
	case unix.ECONNREFUSED, unix.EHOSTUNREACH, unix.ENETUNREACH, unix.EHOSTDOWN, unix.ENETDOWN, unix.EPROTO,
		unix.EMSGSIZE, unix.ETIMEDOUT:
		return true
	}
	return false
}

// mmsghdr is struct mmsghdr of <sys/socket.h> on 64-bit Linux.
type mmsghdr struct {
	hdr unix.Msghdr
	len uint32
	_   [4]byte
}

// udpCarrier is a carrier over a real UDP socket.
type udpCarrier struct {
	conn  *net.UDPConn
	raw   syscall.RawConn
	ipv6  bool
	local netip.AddrPort
	gso   atomic.Bool // send GSO messages as such (else one datagram each)
	gro   bool        // the socket coalesces received datagrams

	// Receive scratch: recv is owned by the one goroutine in ReadBatch, recvNow by the
	// holder of rlock in readNow.
	recv, recvNow recvScratch
	nowCall       func(fd uintptr) // readNow's callback, bound once
	// rlock, if set, is taken by ReadBatch before each recvmmsg and held when it returns
	// (see setReceiveLock).
	rlock *sync.Mutex

	// Send scratch, guarded by wmu (held once per batch, not per packet).
	wmu     sync.Mutex
	whdrs   []mmsghdr
	wiovs   []unix.Iovec
	wcmsgs  []byte
	wmsg    []int  // which message each mmsghdr sends
	wprefix []byte // header sent in front of every datagram (SOCKS), or nil
	wname   unix.RawSockaddrInet6
	wcall   func(fd uintptr) bool
	wn      int
	wdone   int
	werrno  syscall.Errno
	wfrag   bool // the socket lets the kernel fragment now (for messages marked frag)
}

// carrierOptions are the offload switches of the socket.
type carrierOptions struct {
	batch int  // messages per recvmmsg
	gso   bool // try UDP GSO
	gro   bool // try UDP GRO
}

// listenCarrier binds a UDP socket to the local address with large socket buffers and
// the offloads asked for, as far as the kernel has them; notes says what it could not.
func listenCarrier(local netip.AddrPort, opts carrierOptions) (c *udpCarrier, notes []string, err error) {
	network := "udp4"
	if local.Addr().Is6() {
		network = "udp6"
	}
	conn, err := net.ListenUDP(network, net.UDPAddrFromAddrPort(local))
	if err != nil {
		return nil, nil, err
	}
	c, notes, err = newUDPCarrier(conn, opts)
	if err != nil {
		conn.Close()
		return nil, nil, err
	}
	return c, notes, nil
}

func newUDPCarrier(conn *net.UDPConn, opts carrierOptions) (*udpCarrier, []string, error) {
	raw, err := conn.SyscallConn()
	if err != nil {
		return nil, nil, err
	}
	local := conn.LocalAddr().(*net.UDPAddr).AddrPort()
	c := &udpCarrier{conn: conn, raw: raw, ipv6: local.Addr().Is6() && !local.Addr().Is4In6(), local: local,
		recv: newRecvScratch(opts.batch), recvNow: newRecvScratch(receiveNowBatch),
		whdrs: make([]mmsghdr, writeSlots), wiovs: make([]unix.Iovec, 2*writeSlots),
		wcmsgs: make([]byte, writeSlots*cmsgRoom), wmsg: make([]int, writeSlots)}
	c.recv.call, c.nowCall, c.wcall = c.recvmmsgCall, c.recvmmsgNowCall, c.sendmmsgCall
	var notes []string
	var sockErr error
	err = raw.Control(func(fd uintptr) {
		for _, opt := range []struct{ force, plain int }{{unix.SO_RCVBUFFORCE, unix.SO_RCVBUF}, {unix.SO_SNDBUFFORCE, unix.SO_SNDBUF}} {
			// The FORCE variants pass the system limit (root only); fall back to the plain ones.
			if unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, opt.force, carrierSocketBuffer) != nil {
				_ = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, opt.plain, carrierSocketBuffer)
			}
		}
		// Without RECVERR an unconnected socket never hears of ICMP errors. PROBE: DF on
		// every datagram, sizes up to the interface's MTU, the route cache ignored.
		if c.ipv6 {
			sockErr = errors.Join(unix.SetsockoptInt(int(fd), unix.IPPROTO_IPV6, unix.IPV6_RECVERR, 1),
				unix.SetsockoptInt(int(fd), unix.IPPROTO_IPV6, unix.IPV6_MTU_DISCOVER, unix.IPV6_PMTUDISC_PROBE))
		} else {
			sockErr = errors.Join(unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_RECVERR, 1),
				unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_MTU_DISCOVER, unix.IP_PMTUDISC_PROBE))
		}
		if opts.gro {
			if err := unix.SetsockoptInt(int(fd), unix.IPPROTO_UDP, unix.UDP_GRO, 1); err != nil {
				notes = append(notes, fmt.Sprintf("UDP GRO is not available (%v): receiving datagrams one by one", err))
			} else {
				c.gro = true
			}
		}
		if opts.gso {
			// Probing UDP_SEGMENT as a socket option tells whether the kernel has GSO.
			if _, err := unix.GetsockoptInt(int(fd), unix.IPPROTO_UDP, unix.UDP_SEGMENT); err != nil {
				notes = append(notes, fmt.Sprintf("UDP GSO is not available (%v): sending datagrams one by one", err))
			} else {
				c.gso.Store(true)
			}
		}
	})
	if err == nil {
		err = sockErr
	}
	return c, notes, err
}

// receiveBufferSize is the size each receive buffer must have for messages of up to
// datagram bytes.
func (c *udpCarrier) receiveBufferSize(datagram int) int {
	if c.gro {
		return groBufferSize
	}
	return datagram
}

func (c *udpCarrier) LocalAddr() netip.AddrPort { return c.local }

func (c *udpCarrier) Close() error { return c.conn.Close() }

// setTTL sets the default TTL (hop limit) of every carrier packet.
func (c *udpCarrier) setTTL(ttl int) error {
	var err error
	cerr := c.raw.Control(func(fd uintptr) {
		if c.ipv6 {
			err = unix.SetsockoptInt(int(fd), unix.IPPROTO_IPV6, unix.IPV6_UNICAST_HOPS, ttl)
		} else {
			err = unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_TTL, ttl)
		}
	})
	return errors.Join(cerr, err)
}

func (c *udpCarrier) ReadBatch(msgs []carrierMsg) (int, error) {
	return c.readBatch(msgs, nil)
}

// recvScratch is what one recvmmsg needs besides the buffers. The callback given to the
// netpoller is bound once, with its arguments and results in fields, so that a call
// allocates nothing.
type recvScratch struct {
	hdrs  []mmsghdr
	iovs  []unix.Iovec
	names []unix.RawSockaddrInet6
	cmsgs []byte
	call  func(fd uintptr) bool // the netpoller callback (ReadBatch's only)
	n     int
	got   int
	errno syscall.Errno
}

func newRecvScratch(batch int) recvScratch {
	return recvScratch{hdrs: make([]mmsghdr, batch), iovs: make([]unix.Iovec, 2*batch),
		names: make([]unix.RawSockaddrInet6, batch), cmsgs: make([]byte, batch*cmsgRoom)}
}

// readBatch is ReadBatch; with prefixes, each datagram's first len(prefixes[i]) bytes
// go to prefixes[i] and the rest to msgs[i].buf (a datagram shorter than its prefix
// gets n = -1).
func (c *udpCarrier) readBatch(msgs []carrierMsg, prefixes [][]byte) (int, error) {
	c.prepare(&c.recv, msgs, prefixes)
	if err := c.raw.Read(c.recv.call); err != nil {
		if c.rlock != nil {
			c.rlock.Lock() // ReadBatch returns holding the lock, whatever happened
		}
		return 0, err
	}
	return c.results(&c.recv, msgs, prefixes)
}

// setReceiveLock makes ReadBatch take lock before each recvmmsg and return holding it;
// if the recvmmsg finds nothing, ReadBatch lets go of the lock while it waits. The
// holder of the lock may then call readNow. It must be called before the first
// ReadBatch.
func (c *udpCarrier) setReceiveLock(lock *sync.Mutex) { c.rlock = lock }

// readNow is ReadBatch without waiting (at most receiveNowBatch messages): n is 0 if
// nothing is there. The caller holds the receive lock.
func (c *udpCarrier) readNow(msgs []carrierMsg) (int, error) {
	c.prepare(&c.recvNow, msgs, nil)
	if err := c.raw.Control(c.nowCall); err != nil {
		return 0, err
	}
	if c.recvNow.got == 0 && c.recvNow.errno == 0 {
		return 0, nil
	}
	return c.results(&c.recvNow, msgs, nil)
}

// prepare sets up r for a recvmmsg into msgs (and prefixes).
func (c *udpCarrier) prepare(r *recvScratch, msgs []carrierMsg, prefixes [][]byte) {
	n := min(len(msgs), len(r.hdrs))
	for i := 0; i < n; i++ {
		iov := r.iovs[2*i : 2*i+2]
		iovlen := 0
		if prefixes != nil {
			iov[0] = unix.Iovec{Base: &prefixes[i][0]}
			iov[0].SetLen(len(prefixes[i]))
			iovlen++
		}
		iov[iovlen] = unix.Iovec{Base: &msgs[i].buf[0]}
		iov[iovlen].SetLen(len(msgs[i].buf))
		iovlen++
		r.hdrs[i] = mmsghdr{hdr: unix.Msghdr{
			Name: (*byte)(unsafe.Pointer(&r.names[i])), Namelen: unix.SizeofSockaddrInet6,
			Iov: &iov[0], Iovlen: uint64(iovlen)}}
		if c.gro {
			r.hdrs[i].hdr.Control = &r.cmsgs[i*cmsgRoom]
			r.hdrs[i].hdr.SetControllen(cmsgRoom)
		}
	}
	r.n, r.got, r.errno = n, 0, 0
}

// results fills msgs from what the recvmmsg of r returned.
func (c *udpCarrier) results(r *recvScratch, msgs []carrierMsg, prefixes [][]byte) (int, error) {
	got, errno := r.got, r.errno
	if icmpErrno(errno) {
		return 0, c.drainErrors(errno)
	}
	if errno != 0 {
		return 0, os.NewSyscallError("recvmmsg", errno)
	}
	for i := 0; i < got; i++ {
		m := &msgs[i]
		m.n = int(r.hdrs[i].len)
		if prefixes != nil {
			m.n -= len(prefixes[i])
			if m.n < 0 {
				m.n = -1
			}
		}
		m.from = sockaddrToAddrPort(&r.names[i])
		m.segSize = 0
		if c.gro {
			m.segSize = groSegmentSize(r.cmsgs[i*cmsgRoom : i*cmsgRoom+int(r.hdrs[i].hdr.Controllen)])
		}
	}
	return got, nil
}

// recvmmsgCall is ReadBatch's netpoller callback: one recvmmsg of c.recv.n messages,
// under the receive lock if there is one (kept if something came, else let go of).
func (c *udpCarrier) recvmmsgCall(fd uintptr) bool {
	if c.rlock != nil {
		c.rlock.Lock()
	}
	r := &c.recv
	got, _, e := unix.Syscall6(unix.SYS_RECVMMSG, fd, uintptr(unsafe.Pointer(&r.hdrs[0])), uintptr(r.n),
		unix.MSG_DONTWAIT, 0, 0)
	if e == unix.EAGAIN || e == unix.EINTR {
		if c.rlock != nil {
			c.rlock.Unlock()
		}
		return false
	}
	r.got, r.errno = int(got), e
	return true
}

// recvmmsgNowCall is readNow's callback: one recvmmsg that does not wait.
func (c *udpCarrier) recvmmsgNowCall(fd uintptr) {
	r := &c.recvNow
	got, _, e := unix.Syscall6(unix.SYS_RECVMMSG, fd, uintptr(unsafe.Pointer(&r.hdrs[0])), uintptr(r.n),
		unix.MSG_DONTWAIT, 0, 0)
	if e == unix.EAGAIN || e == unix.EINTR {
		return
	}
	r.got, r.errno = int(got), e
}

// groSegmentSize finds the UDP_GRO control message of a received message: the size of
// the datagrams it holds. 0 means one datagram.
func groSegmentSize(oob []byte) int {
	for len(oob) >= unix.SizeofCmsghdr {
		h := (*unix.Cmsghdr)(unsafe.Pointer(&oob[0]))
		if h.Len < unix.SizeofCmsghdr || int(h.Len) > len(oob) {
			return 0
		}
		if h.Level == unix.IPPROTO_UDP && h.Type == unix.UDP_GRO && int(h.Len) >= unix.CmsgLen(2) {
			data := oob[unix.CmsgLen(0):]
			if int(h.Len) >= unix.CmsgLen(4) {
				return int(binary.NativeEndian.Uint32(data))
			}
			return int(binary.NativeEndian.Uint16(data))
		}
		oob = oob[min(len(oob), unix.CmsgSpace(int(h.Len)-unix.CmsgLen(0))):]
	}
	return 0
}

// sockaddrToAddrPort decodes a sockaddr_in or sockaddr_in6 written by the kernel.
func sockaddrToAddrPort(sa *unix.RawSockaddrInet6) netip.AddrPort {
	switch sa.Family {
	case unix.AF_INET:
		sa4 := (*unix.RawSockaddrInet4)(unsafe.Pointer(sa))
		port := binary.BigEndian.Uint16((*[2]byte)(unsafe.Pointer(&sa4.Port))[:])
		return netip.AddrPortFrom(netip.AddrFrom4(sa4.Addr), port)
	case unix.AF_INET6:
		port := binary.BigEndian.Uint16((*[2]byte)(unsafe.Pointer(&sa.Port))[:])
		return netip.AddrPortFrom(netip.AddrFrom16(sa.Addr).Unmap(), port)
	}
	return netip.AddrPort{}
}

// putSockaddr encodes an address for this socket's family; it returns the length.
func (c *udpCarrier) putSockaddr(sa *unix.RawSockaddrInet6, to netip.AddrPort) (uint32, error) {
	*sa = unix.RawSockaddrInet6{}
	port := (*[2]byte)(unsafe.Pointer(&sa.Port))
	if !c.ipv6 {
		if !to.Addr().Is4() {
			return 0, fmt.Errorf("cannot send to %s from an IPv4 socket", to)
		}
		sa4 := (*unix.RawSockaddrInet4)(unsafe.Pointer(sa))
		sa4.Family = unix.AF_INET
		sa4.Addr = to.Addr().As4()
		binary.BigEndian.PutUint16(port[:], to.Port())
		return unix.SizeofSockaddrInet4, nil
	}
	sa.Family = unix.AF_INET6
	sa.Addr = to.Addr().As16()
	binary.BigEndian.PutUint16(port[:], to.Port())
	return unix.SizeofSockaddrInet6, nil
}

// putCmsgs writes the control messages of one sendmsg (TTL, TOS, GSO segment size) and
// returns how many bytes they take.
func (c *udpCarrier) putCmsgs(b []byte, ttl, tos uint8, segSize int) int {
	level, ttlType, tosType := unix.IPPROTO_IP, unix.IP_TTL, unix.IP_TOS
	if c.ipv6 {
		level, ttlType, tosType = unix.IPPROTO_IPV6, unix.IPV6_HOPLIMIT, unix.IPV6_TCLASS
	}
	off := 0
	put := func(level, typ, size int, v uint32) {
		h := (*unix.Cmsghdr)(unsafe.Pointer(&b[off]))
		h.Level, h.Type = int32(level), int32(typ)
		h.SetLen(unix.CmsgLen(size))
		data := b[off+unix.CmsgLen(0):]
		if size == 2 {
			binary.NativeEndian.PutUint16(data, uint16(v))
		} else {
			binary.NativeEndian.PutUint32(data, v)
		}
		off += unix.CmsgSpace(size)
	}
	if ttl != 0 {
		put(level, ttlType, 4, uint32(ttl))
	}
	if tos != 0 {
		put(level, tosType, 4, uint32(tos))
	}
	if segSize > 0 {
		put(unix.IPPROTO_UDP, unix.UDP_SEGMENT, 2, uint32(segSize))
	}
	return off
}

// fill prepares mmsghdrs for msgs[from:], as many as fit: a GSO message as one mmsghdr
// while GSO is on, else one per datagram. It stops where the messages' frag mark
// changes (the socket's DF setting changes there). It returns how many mmsghdrs it
// filled and how many messages they cover completely.
func (c *udpCarrier) fill(msgs []carrierMsg, from int, namelen uint32) (hdrs, done int) {
	gso := c.gso.Load()
	for i := from; i < len(msgs); i++ {
		m := &msgs[i]
		if m.frag != msgs[from].frag {
			break
		}
		pieces := 1
		if m.segSize > 0 && len(m.buf) > m.segSize && !gso {
			pieces = (len(m.buf) + m.segSize - 1) / m.segSize
		}
		if hdrs+pieces > len(c.whdrs) {
			break
		}
		for p := 0; p < pieces; p++ {
			b, segSize := m.buf, 0
			switch {
			case pieces > 1:
				b = m.buf[p*m.segSize : min(len(m.buf), (p+1)*m.segSize)]
			case m.segSize > 0 && len(m.buf) > m.segSize:
				segSize = m.segSize
			}
			k := hdrs + p
			iov := c.wiovs[2*k : 2*k+2]
			iovlen := 0
			if c.wprefix != nil {
				iov[0] = unix.Iovec{Base: &c.wprefix[0]}
				iov[0].SetLen(len(c.wprefix))
				iovlen++
			}
			iov[iovlen] = unix.Iovec{Base: &b[0]}
			iov[iovlen].SetLen(len(b))
			iovlen++
			c.whdrs[k] = mmsghdr{hdr: unix.Msghdr{
				Name: (*byte)(unsafe.Pointer(&c.wname)), Namelen: namelen, Iov: &iov[0], Iovlen: uint64(iovlen)}}
			if m.ttl != 0 || m.tos != 0 || segSize != 0 {
				cm := c.wcmsgs[k*cmsgRoom : (k+1)*cmsgRoom]
				c.whdrs[k].hdr.Control = &cm[0]
				c.whdrs[k].hdr.SetControllen(c.putCmsgs(cm, m.ttl, m.tos, segSize))
			}
			c.wmsg[k] = i
		}
		hdrs += pieces
		done++
	}
	return hdrs, done
}

func (c *udpCarrier) WriteBatch(msgs []carrierMsg, to netip.AddrPort) error {
	return c.writeBatch(msgs, to, nil)
}

// writeBatch is WriteBatch; with a prefix, every datagram goes out behind it (a GSO
// message cannot: it must be split, so GSO must be off).
func (c *udpCarrier) writeBatch(msgs []carrierMsg, to netip.AddrPort, prefix []byte) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.wprefix = prefix
	defer func() { c.wprefix = nil }()
	namelen, err := c.putSockaddr(&c.wname, to)
	if err != nil {
		return err
	}
	var errs error
	retried := -1 // the message sent a second time after an error that was not its own
	for next := 0; next < len(msgs); {
		hdrs, done := c.fill(msgs, next, namelen)
		if hdrs == 0 {
			return errors.Join(errs, fmt.Errorf("a message of %d bytes does not fit a batch", len(msgs[next].buf)))
		}
		if msgs[next].frag != c.wfrag {
			if err := c.setFragmenting(msgs[next].frag); err != nil {
				errs = errors.Join(errs, err)
				next += done
				continue
			}
		}
		sent, err := c.sendmmsg(hdrs)
		if err == nil {
			next += done
			continue
		}
		failed := c.wmsg[sent]
		var errno syscall.Errno
		errors.As(err, &errno)
		m := &msgs[failed]
		switch {
		case c.gso.Load() && m.segSize > 0 && len(m.buf) > m.segSize &&
			(errno == unix.EIO || errno == unix.EMSGSIZE || errno == unix.EINVAL):
			ue := c.drainErrors(errno)
			size := m.segSize + c.headerSize()
			if mtu := deviceMTUTo(to.Addr()); !ue.tooBigLocally(size) && mtu > 0 && mtu < size {
				// The kernel refuses GSO segments larger than the interface (EINVAL) and
				// reports nothing: say so as it would for a single datagram.
				ue.count++
				ue.reports = append(ue.reports, carrierReport{kind: reportLocalTooBig, dst: to, mtu: mtu})
			}
			if ue.count > 0 {
				errs = errors.Join(errs, ue)
			}
			if ue.tooBigLocally(size) {
				// The datagrams are larger than the interface takes: not a GSO failure.
				// The link hears of it from the report; these datagrams are lost.
				next = failed + 1
				continue
			}
			// The kernel cannot segment (no checksum offload on the way out, an old
			// kernel): retry this message and the rest without GSO, from now on.
			c.gso.Store(false)
			errs = errors.Join(errs, &gsoFallbackError{err: errno})
			next = failed
		case icmpErrno(errno):
			// Mostly the report of an ICMP error that arrived meanwhile, returned by the
			// first system call after it: this datagram did not go out, through no fault
			// of its own, so it goes again, once.
			ue := c.drainErrors(errno)
			next = failed + 1
			switch {
			case ue.count == 0:
				// Nothing reported: this send's own failure (no route to the peer, say).
				errs = errors.Join(errs, os.NewSyscallError("sendmmsg", errno))
			case retried != failed:
				errs = errors.Join(errs, ue)
				retried, next = failed, failed
			default:
				errs = errors.Join(errs, ue)
			}
		default:
			errs = errors.Join(errs, err)
			next = failed + 1
		}
	}
	if c.wfrag {
		errs = errors.Join(errs, c.setFragmenting(false))
	}
	return errs
}

// setFragmenting switches the socket between DF on every datagram (the rule) and letting
// the kernel fragment (for messages marked frag), under wmu: only writeBatch sends.
func (c *udpCarrier) setFragmenting(on bool) error {
	var err error
	cerr := c.raw.Control(func(fd uintptr) {
		switch {
		case c.ipv6 && on:
			err = unix.SetsockoptInt(int(fd), unix.IPPROTO_IPV6, unix.IPV6_MTU_DISCOVER, unix.IPV6_PMTUDISC_DONT)
		case c.ipv6:
			err = unix.SetsockoptInt(int(fd), unix.IPPROTO_IPV6, unix.IPV6_MTU_DISCOVER, unix.IPV6_PMTUDISC_PROBE)
		case on:
			err = unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_MTU_DISCOVER, unix.IP_PMTUDISC_DONT)
		default:
			err = unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_MTU_DISCOVER, unix.IP_PMTUDISC_PROBE)
		}
	})
	if err = errors.Join(cerr, err); err != nil {
		return fmt.Errorf("switching fragmentation: %w", err)
	}
	c.wfrag = on
	return nil
}

// sendmmsg sends c.whdrs[:n], waiting while the socket buffer is full. It returns how
// many went out before an error.
func (c *udpCarrier) sendmmsg(n int) (int, error) {
	c.wn, c.wdone, c.werrno = n, 0, 0
	err := c.raw.Write(c.wcall)
	if err != nil {
		return c.wdone, err
	}
	if c.werrno != 0 {
		return c.wdone, os.NewSyscallError("sendmmsg", c.werrno)
	}
	return c.wdone, nil
}

// sendmmsgCall is sendmmsg's netpoller callback: it sends c.whdrs[c.wdone:c.wn].
func (c *udpCarrier) sendmmsgCall(fd uintptr) bool {
	for c.wdone < c.wn {
		r, _, e := unix.Syscall6(unix.SYS_SENDMMSG, fd, uintptr(unsafe.Pointer(&c.whdrs[c.wdone])),
			uintptr(c.wn-c.wdone), unix.MSG_DONTWAIT, 0, 0)
		switch {
		case e == unix.EAGAIN:
			return false
		case e == unix.EINTR:
			continue
		case e != 0:
			c.werrno = e
			return true
		}
		c.wdone += int(r)
	}
	return true
}

// headerSize is the size of the carrier's IP and UDP headers.
func (c *udpCarrier) headerSize() int {
	if c.ipv6 {
		return carrierIPv6Overhead
	}
	return carrierIPv4Overhead
}

// drainErrors reads the socket's error queue, where the kernel keeps one entry per ICMP
// error (and per local "too big"), and returns what it found (count may be 0: errno
// alone). At most errorQueueDrain entries are read, and reportsKept kept.
func (c *udpCarrier) drainErrors(errno syscall.Errno) *unreachableError {
	ue := &unreachableError{err: errno}
	var buf [quoteKept]byte
	var oob [512]byte
	// Control, not Read: the receiving goroutine may hold the read lock while it waits.
	_ = c.raw.Control(func(fd uintptr) {
		for range errorQueueDrain {
			n, oobn, _, from, err := unix.Recvmsg(int(fd), buf[:], oob[:], unix.MSG_ERRQUEUE|unix.MSG_DONTWAIT)
			if err != nil {
				return // EAGAIN: the queue is empty
			}
			ue.count++
			if len(ue.reports) == reportsKept {
				continue
			}
			r, ok := parseErrorQueueEntry(oob[:oobn])
			if !ok {
				continue
			}
			r.dst = sockaddrOf(from)
			r.quoted = n
			copy(r.quote[:], buf[:n])
			ue.reports = append(ue.reports, r)
		}
	})
	return ue
}

// tooBigLocally reports whether our own kernel said a datagram of size bytes is larger
// than the interface takes.
func (e *unreachableError) tooBigLocally(size int) bool {
	for _, r := range e.reports {
		if r.kind == reportLocalTooBig && r.mtu > 0 && r.mtu < size {
			return true
		}
	}
	return false
}

// sockaddrOf turns the address of an error-queue entry (the reported datagram's
// destination) into an AddrPort; the zero AddrPort if it has none.
func sockaddrOf(sa unix.Sockaddr) netip.AddrPort {
	switch sa := sa.(type) {
	case *unix.SockaddrInet4:
		return netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), uint16(sa.Port))
	case *unix.SockaddrInet6:
		return netip.AddrPortFrom(netip.AddrFrom16(sa.Addr).Unmap(), uint16(sa.Port))
	}
	return netip.AddrPort{}
}

// parseErrorQueueEntry reads the sock_extended_err of an error-queue entry's control
// messages: an ICMP "fragmentation needed" or ICMPv6 "packet too big" (with the size the
// reporter says fits), a local EMSGSIZE (with the interface's MTU), or another error.
func parseErrorQueueEntry(oob []byte) (carrierReport, bool) {
	for len(oob) >= unix.SizeofCmsghdr {
		h := (*unix.Cmsghdr)(unsafe.Pointer(&oob[0]))
		if h.Len < unix.SizeofCmsghdr || int(h.Len) > len(oob) {
			return carrierReport{}, false
		}
		data := oob[unix.CmsgLen(0):h.Len]
		if ((h.Level == unix.IPPROTO_IP && h.Type == unix.IP_RECVERR) ||
			(h.Level == unix.IPPROTO_IPV6 && h.Type == unix.IPV6_RECVERR)) && len(data) >= int(unsafe.Sizeof(unix.SockExtendedErr{})) {
			ee := (*unix.SockExtendedErr)(unsafe.Pointer(&data[0]))
			switch {
			case ee.Origin == unix.SO_EE_ORIGIN_ICMP && ee.Type == 3 && ee.Code == 4, // fragmentation needed
				ee.Origin == unix.SO_EE_ORIGIN_ICMP6 && ee.Type == 2: // packet too big
				return carrierReport{kind: reportTooBig, mtu: int(min(ee.Info, 65535))}, true
			case ee.Origin == unix.SO_EE_ORIGIN_LOCAL && syscall.Errno(ee.Errno) == unix.EMSGSIZE:
				return carrierReport{kind: reportLocalTooBig, mtu: int(min(ee.Info, 65535))}, true
			}
			return carrierReport{kind: reportUnreachable}, true
		}
		oob = oob[min(len(oob), unix.CmsgSpace(int(h.Len)-unix.CmsgLen(0))):]
	}
	return carrierReport{}, false
}
