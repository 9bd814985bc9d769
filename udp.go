package main

// The carrier: one UDP socket, read and written in batches with recvmmsg(2) and
// sendmmsg(2) through the Go netpoller, without allocating per packet.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"sync"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

const (
	carrierSocketBuffer = 4 << 20 // bytes of kernel socket buffer in each direction
	cmsgRoom            = 64      // control bytes per message: TTL and TOS with headers
)

// carrierMsg is one datagram of a batch.
type carrierMsg struct {
	buf  []byte         // receive: room for the datagram; send: the datagram
	n    int            // receive: size of the datagram
	from netip.AddrPort // receive: where it came from
	ttl  uint8          // send: TTL / hop limit of the carrier packet; 0: the socket's
	tos  uint8          // send: TOS / traffic class of the carrier packet
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

	// Receive scratch, owned by the one goroutine in ReadBatch.
	rhdrs  []mmsghdr
	riovs  []unix.Iovec
	rnames []unix.RawSockaddrInet6

	// Send scratch, guarded by wmu (held once per batch, not per packet).
	wmu    sync.Mutex
	whdrs  []mmsghdr
	wiovs  []unix.Iovec
	wcmsgs []byte
	wname  unix.RawSockaddrInet6
}

// listenCarrier binds a UDP socket to the local address with large socket buffers.
func listenCarrier(local netip.AddrPort, batch int) (*udpCarrier, error) {
	network := "udp4"
	if local.Addr().Is6() {
		network = "udp6"
	}
	conn, err := net.ListenUDP(network, net.UDPAddrFromAddrPort(local))
	if err != nil {
		return nil, err
	}
	c, err := newUDPCarrier(conn, batch)
	if err != nil {
		conn.Close()
		return nil, err
	}
	return c, nil
}

func newUDPCarrier(conn *net.UDPConn, batch int) (*udpCarrier, error) {
	raw, err := conn.SyscallConn()
	if err != nil {
		return nil, err
	}
	local := conn.LocalAddr().(*net.UDPAddr).AddrPort()
	c := &udpCarrier{conn: conn, raw: raw, ipv6: local.Addr().Is6() && !local.Addr().Is4In6(), local: local,
		rhdrs: make([]mmsghdr, batch), riovs: make([]unix.Iovec, batch), rnames: make([]unix.RawSockaddrInet6, batch),
		whdrs: make([]mmsghdr, batch), wiovs: make([]unix.Iovec, batch), wcmsgs: make([]byte, batch*cmsgRoom)}
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
	})
	if err == nil {
		err = sockErr
	}
	return c, err
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
	n := min(len(msgs), len(c.rhdrs))
	for i := 0; i < n; i++ {
		c.riovs[i] = unix.Iovec{Base: &msgs[i].buf[0]}
		c.riovs[i].SetLen(len(msgs[i].buf))
		c.rhdrs[i] = mmsghdr{hdr: unix.Msghdr{
			Name: (*byte)(unsafe.Pointer(&c.rnames[i])), Namelen: unix.SizeofSockaddrInet6,
			Iov: &c.riovs[i], Iovlen: 1}}
	}
	var got int
	var errno syscall.Errno
	err := c.raw.Read(func(fd uintptr) bool {
		r, _, e := unix.Syscall6(unix.SYS_RECVMMSG, fd, uintptr(unsafe.Pointer(&c.rhdrs[0])), uintptr(n),
			unix.MSG_DONTWAIT, 0, 0)
		if e == unix.EAGAIN || e == unix.EINTR {
			return false
		}
		got, errno = int(r), e
		return true
	})
	if err != nil {
		return 0, err
	}
	if icmpErrno(errno) {
		return 0, c.drainErrors(errno)
	}
	if errno != 0 {
		return 0, os.NewSyscallError("recvmmsg", errno)
	}
	for i := 0; i < got; i++ {
		msgs[i].n = int(c.rhdrs[i].len)
		msgs[i].from = sockaddrToAddrPort(&c.rnames[i])
	}
	return got, nil
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

// putCmsgs writes the TTL and TOS control messages of one datagram and returns how many
// bytes they take.
func (c *udpCarrier) putCmsgs(b []byte, ttl, tos uint8) int {
	level, ttlType, tosType := unix.IPPROTO_IP, unix.IP_TTL, unix.IP_TOS
	if c.ipv6 {
		level, ttlType, tosType = unix.IPPROTO_IPV6, unix.IPV6_HOPLIMIT, unix.IPV6_TCLASS
	}
	off := 0
	put := func(typ int, v uint8) {
		h := (*unix.Cmsghdr)(unsafe.Pointer(&b[off]))
		h.Level, h.Type = int32(level), int32(typ)
		h.SetLen(unix.CmsgLen(4))
		binary.NativeEndian.PutUint32(b[off+unix.CmsgLen(0):], uint32(v))
		off += unix.CmsgSpace(4)
	}
	if ttl != 0 {
		put(ttlType, ttl)
	}
	if tos != 0 {
		put(tosType, tos)
	}
	return off
}

func (c *udpCarrier) WriteBatch(msgs []carrierMsg, to netip.AddrPort) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	namelen, err := c.putSockaddr(&c.wname, to)
	if err != nil {
		return err
	}
	var firstErr error
	for len(msgs) > 0 {
		n := min(len(msgs), len(c.whdrs))
		for i := 0; i < n; i++ {
			m := &msgs[i]
			c.wiovs[i] = unix.Iovec{Base: &m.buf[0]}
			c.wiovs[i].SetLen(len(m.buf))
			c.whdrs[i] = mmsghdr{hdr: unix.Msghdr{
				Name: (*byte)(unsafe.Pointer(&c.wname)), Namelen: namelen, Iov: &c.wiovs[i], Iovlen: 1}}
			if m.ttl != 0 || m.tos != 0 {
				cm := c.wcmsgs[i*cmsgRoom : (i+1)*cmsgRoom]
				c.whdrs[i].hdr.Control = &cm[0]
				c.whdrs[i].hdr.SetControllen(c.putCmsgs(cm, m.ttl, m.tos))
			}
		}
		sent, err := c.sendmmsg(n)
		if err != nil {
			// Skip the datagram the kernel refused and go on with the rest.
			var errno syscall.Errno
			if errors.As(err, &errno) && icmpErrno(errno) {
				err = c.drainErrors(errno)
			}
			firstErr = errors.Join(firstErr, err)
			sent++
		}
		msgs = msgs[min(sent, len(msgs)):]
	}
	return firstErr
}

// sendmmsg sends c.whdrs[:n], waiting while the socket buffer is full. It returns how
// many went out before an error.
func (c *udpCarrier) sendmmsg(n int) (int, error) {
	done := 0
	var errno syscall.Errno
	err := c.raw.Write(func(fd uintptr) bool {
		for done < n {
			r, _, e := unix.Syscall6(unix.SYS_SENDMMSG, fd, uintptr(unsafe.Pointer(&c.whdrs[done])), uintptr(n-done),
				unix.MSG_DONTWAIT, 0, 0)
			switch {
			case e == unix.EAGAIN:
				return false
			case e == unix.EINTR:
				continue
			case e != 0:
				errno = e
				return true
			}
			done += int(r)
		}
		return true
	})
	if err != nil {
		return done, err
	}
	if errno != 0 {
		return done, os.NewSyscallError("sendmmsg", errno)
	}
	return done, nil
}

// drainErrors reads the socket's error queue, where the kernel keeps one entry per ICMP
// error, and returns them as one *unreachableError (at least one: errno itself). Errors
// for other destinations than the ones we send to cannot occur on this socket.
func (c *udpCarrier) drainErrors(errno syscall.Errno) *unreachableError {
	ue := &unreachableError{err: errno}
	var buf [1]byte
	oob := make([]byte, 512)
	// Control, not Read: the receiving goroutine may hold the read lock while it waits.
	_ = c.raw.Control(func(fd uintptr) {
		for {
			_, _, _, _, err := unix.Recvmsg(int(fd), buf[:], oob, unix.MSG_ERRQUEUE|unix.MSG_DONTWAIT)
			if err != nil {
				return // EAGAIN: the queue is empty
			}
			ue.count++
		}
	})
	ue.count = max(ue.count, 1)
	return ue
}
