package main

// The carrier: one UDP socket, read and written in batches with recvmmsg(2) and
// sendmmsg(2) through the Go netpoller, without allocating per packet. With UDP GSO a
// message of the batch carries many datagrams of one size, which the kernel splits (or
// hands to the NIC) late; with UDP GRO one received message holds many datagrams.

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
	"time"
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
}

// datagrams calls fn for each datagram of a received message.
func (m *carrierMsg) datagrams(fn func(d []byte)) {
	b := m.buf[:m.n]
	if m.segSize <= 0 {
		fn(b)
		return
	}
	for len(b) > 0 {
		n := min(m.segSize, len(b))
		fn(b[:n:n])
		b = b[n:]
	}
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
	// pathMTU is the largest IP packet the path to the peer takes, as the network last
	// reported it (ICMP "fragmentation needed" / "packet too big"), or 0 if it did not.
	pathMTU() int
	LocalAddr() netip.AddrPort
	Close() error
}

// unreachableError says that the kernel reported ICMP errors (port or host unreachable,
// and the like) for count datagrams sent to the peer: the carrier errors of maxerr.
type unreachableError struct {
	count int
	err   error // the last one
}

func (e *unreachableError) Error() string {
	return fmt.Sprintf("%d datagrams refused on the way to the peer (last: %v)", e.count, e.err)
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

	// The path MTU reported by the network, and until when that report holds (monotonic
	// nanoseconds since created), like the kernel's own path MTU cache.
	created   time.Time
	pmtu      atomic.Int32
	pmtuUntil atomic.Int64

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
	c := &udpCarrier{conn: conn, raw: raw, ipv6: local.Addr().Is6() && !local.Addr().Is4In6(), local: local, created: time.Now(),
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
		// Without RECVERR an unconnected socket never hears of ICMP errors.
		if c.ipv6 {
			sockErr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IPV6, unix.IPV6_RECVERR, 1)
		} else {
			sockErr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_RECVERR, 1)
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

// pathMTUExpiry is how long a reported path MTU is believed (the kernel's default too).
const pathMTUExpiry = 10 * time.Minute

func (c *udpCarrier) pathMTU() int {
	if time.Since(c.created).Nanoseconds() > c.pmtuUntil.Load() {
		return 0
	}
	return int(c.pmtu.Load())
}

// notePathMTU records a path MTU the network reported.
func (c *udpCarrier) notePathMTU(mtu int) {
	if mtu < 68 || mtu > 65535 {
		return
	}
	c.pmtu.Store(int32(mtu))
	c.pmtuUntil.Store((time.Since(c.created) + pathMTUExpiry).Nanoseconds())
}

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
// while GSO is on, else one per datagram. It returns how many mmsghdrs it filled and
// how many messages they cover completely.
func (c *udpCarrier) fill(msgs []carrierMsg, from int, namelen uint32) (hdrs, done int) {
	gso := c.gso.Load()
	pmtu := c.pathMTU()
	for i := from; i < len(msgs); i++ {
		m := &msgs[i]
		pieces := 1
		// A GSO message goes out as such only if its datagrams fit the path: larger ones
		// must be sent one by one, for the kernel to fragment them.
		if m.segSize > 0 && len(m.buf) > m.segSize && (!gso || (pmtu > 0 && m.segSize+c.headerSize() > pmtu)) {
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
	for next := 0; next < len(msgs); {
		hdrs, done := c.fill(msgs, next, namelen)
		if hdrs == 0 {
			return errors.Join(errs, fmt.Errorf("a message of %d bytes does not fit a batch", len(msgs[next].buf)))
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
			if mtu := c.kernelPathMTU(to); mtu > 0 && m.segSize+c.headerSize() > mtu {
				// The path is smaller than the datagrams: not a GSO failure. fill now
				// sends this message's datagrams one by one.
				c.notePathMTU(mtu)
				next = failed
				continue
			}
			// The kernel cannot segment (no checksum offload on the way out, an old
			// kernel): retry this message and the rest without GSO, from now on.
			c.gso.Store(false)
			errs = errors.Join(errs, &gsoFallbackError{err: errno})
			next = failed
		case icmpErrno(errno):
			// A datagram the kernel refused is lost (with the rest of its message, if it
			// was split), the others go on.
			errs = errors.Join(errs, c.drainErrors(errno))
			next = failed + 1
		default:
			errs = errors.Join(errs, err)
			next = failed + 1
		}
	}
	return errs
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

// kernelPathMTU asks the kernel for its path MTU towards to (through a throwaway
// connected socket); 0 if it cannot tell.
func (c *udpCarrier) kernelPathMTU(to netip.AddrPort) int {
	network := "udp4"
	if c.ipv6 {
		network = "udp6"
	}
	probe, err := net.DialUDP(network, nil, net.UDPAddrFromAddrPort(to))
	if err != nil {
		return 0
	}
	defer probe.Close()
	raw, err := probe.SyscallConn()
	if err != nil {
		return 0
	}
	mtu := 0
	_ = raw.Control(func(fd uintptr) {
		if c.ipv6 {
			mtu, _ = unix.GetsockoptInt(int(fd), unix.IPPROTO_IPV6, unix.IPV6_MTU)
		} else {
			mtu, _ = unix.GetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_MTU)
		}
	})
	return mtu
}

// drainErrors reads the socket's error queue, where the kernel keeps one entry per ICMP
// error, and returns them as one *unreachableError (at least one: errno itself). A
// "fragmentation needed" or "packet too big" report updates the path MTU instead and is
// not counted as an error.
func (c *udpCarrier) drainErrors(errno syscall.Errno) *unreachableError {
	ue := &unreachableError{err: errno}
	var buf [1]byte
	var oob [512]byte
	// Control, not Read: the receiving goroutine may hold the read lock while it waits.
	_ = c.raw.Control(func(fd uintptr) {
		for {
			_, oobn, _, _, err := unix.Recvmsg(int(fd), buf[:], oob[:], unix.MSG_ERRQUEUE|unix.MSG_DONTWAIT)
			if err != nil {
				return // EAGAIN: the queue is empty
			}
			if mtu := pathMTUReport(oob[:oobn]); mtu > 0 {
				c.notePathMTU(mtu)
				continue
			}
			ue.count++
		}
	})
	if ue.count == 0 && errno == unix.EMSGSIZE {
		return ue // only path MTU news
	}
	ue.count = max(ue.count, 1)
	return ue
}

// pathMTUReport finds a path MTU in an error-queue entry's control messages: the
// sock_extended_err of an ICMP "fragmentation needed" or ICMPv6 "packet too big", or of
// a local EMSGSIZE. 0 if there is none.
func pathMTUReport(oob []byte) int {
	for len(oob) >= unix.SizeofCmsghdr {
		h := (*unix.Cmsghdr)(unsafe.Pointer(&oob[0]))
		if h.Len < unix.SizeofCmsghdr || int(h.Len) > len(oob) {
			return 0
		}
		data := oob[unix.CmsgLen(0):h.Len]
		if ((h.Level == unix.IPPROTO_IP && h.Type == unix.IP_RECVERR) ||
			(h.Level == unix.IPPROTO_IPV6 && h.Type == unix.IPV6_RECVERR)) && len(data) >= int(unsafe.Sizeof(unix.SockExtendedErr{})) {
			ee := (*unix.SockExtendedErr)(unsafe.Pointer(&data[0]))
			switch {
			case ee.Origin == unix.SO_EE_ORIGIN_ICMP && ee.Type == 3 && ee.Code == 4, // fragmentation needed
				ee.Origin == unix.SO_EE_ORIGIN_ICMP6 && ee.Type == 2, // packet too big
				ee.Origin == unix.SO_EE_ORIGIN_LOCAL && syscall.Errno(ee.Errno) == unix.EMSGSIZE:
				return int(ee.Info)
			}
		}
		oob = oob[min(len(oob), unix.CmsgSpace(int(h.Len)-unix.CmsgLen(0))):]
	}
	return 0
}
