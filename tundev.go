package main

// The interface side of the data path: a TUN device read and written either with virtio
// headers (offloads: the kernel hands us super-packets and takes them back) or plainly,
// one packet per read and write, through the wireguard tun package's Device.

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
	"golang.zx2c4.com/wireguard/tun"
)

const (
	vnetReadFrames = 4                                // frames read per batch with offloads
	vnetFrameSize  = virtioNetHdrLen + maxSuperPacket // the largest frame the kernel hands us
	maxWriteIovecs = 1 + maxRunPackets                // virtio header, first packet, the others' payloads
)

// tunFrame is what one read from the device gives: a packet, or with offloads a
// super-packet and its virtio header.
type tunFrame struct {
	hdr virtioNetHdr
	pkt []byte
}

// frameBatch holds the buffers frames are read into, and the frames of the last read.
type frameBatch struct {
	bufs   [][]byte
	sizes  []int
	frames []tunFrame
}

func newFrameBatch(n, size int) *frameBatch {
	fb := &frameBatch{bufs: make([][]byte, n), sizes: make([]int, n), frames: make([]tunFrame, 0, n)}
	for i := range fb.bufs {
		fb.bufs[i] = make([]byte, size)
	}
	return fb
}

// tunPort is the interface side of the data path. read and readNow share the outbound
// state (the frame batch and what it is sealed into), guarded by one lock; write is called
// under the inbound lock (packetPath.inMu) only.
type tunPort interface {
	// read blocks until a frame is ready, then reads the frames that are ready, as many
	// as fb has buffers for, into fb.frames. It takes lock to read, and returns with it
	// held (also with an error): the caller processes the frames and unlocks.
	read(fb *frameBatch, lock *sync.Mutex) error
	// readNow reads, into fb.frames, the frames ready now, without waiting; a port that
	// cannot read without waiting reads none. The caller holds the lock.
	readNow(fb *frameBatch) error
	// readsNow reports whether readNow can read anything at all.
	readsNow() bool
	// write hands inner packets to the kernel. It may change their bytes.
	write(pkts []innerPacket) error
	// newFrameBatch makes the buffers read needs.
	newFrameBatch() *frameBatch
	// inject writes one complete packet (a checksum-complete one we made). It is called
	// by the outbound loop only, and may run alongside write.
	inject(pkt []byte) error
}

// errCoalesceFallback reports that the kernel refused a coalesced write: coalescing is off
// from now on and the packets were written one by one.
type errCoalesceFallback struct{ err error }

func (e *errCoalesceFallback) Error() string {
	return fmt.Sprintf("the interface refused a coalesced packet (%v): writing packets one by one from now on", e.err)
}

// vnetPort reads and writes a TUN device opened with IFF_VNET_HDR and offloads on (as
// tun.CreateTUN does), on its file descriptor, through the Go netpoller.
type vnetPort struct {
	raw      syscall.RawConn
	coalesce atomic.Bool

	// Read state. The netpoller callbacks are bound once, with their arguments and
	// results in fields, so that a read allocates nothing. rbatch and rlock belong to the
	// outbound loop (read); cur and rerr are written only under the outbound lock, by read
	// and by readNow alike.
	rcall   func(fd uintptr) bool
	nowcall func(fd uintptr)
	rbatch  *frameBatch
	rlock   *sync.Mutex
	cur     *frameBatch
	rerr    error

	// Write scratch, used under the inbound lock (packetPath.inMu), likewise.
	iovs   [maxWriteIovecs]unix.Iovec
	vhdr   [virtioNetHdrLen]byte
	vhead  virtioNetHdr
	wcall  func(fd uintptr) bool
	wn     int
	werrno syscall.Errno

	// inject's scratch, owned by the outbound loop.
	ivhdr [virtioNetHdrLen]byte
}

func newVnetPort(f *os.File, coalesce bool) (*vnetPort, error) {
	raw, err := f.SyscallConn()
	if err != nil {
		return nil, err
	}
	p := &vnetPort{raw: raw}
	p.rcall, p.nowcall, p.wcall = p.readCall, p.readAvailable, p.writevCall
	p.coalesce.Store(coalesce)
	return p, nil
}

func (p *vnetPort) newFrameBatch() *frameBatch { return newFrameBatch(vnetReadFrames, vnetFrameSize) }

func (p *vnetPort) read(fb *frameBatch, lock *sync.Mutex) error {
	p.rbatch, p.rlock = fb, lock
	err := p.raw.Read(p.rcall)
	if err != nil {
		lock.Lock() // read returns holding the lock, whatever happened
		return err
	}
	return p.readResult(fb)
}

func (p *vnetPort) readsNow() bool { return true }

func (p *vnetPort) readNow(fb *frameBatch) error {
	p.cur = fb // the caller holds the lock
	if err := p.raw.Control(p.nowcall); err != nil {
		return err
	}
	return p.readResult(fb)
}

func (p *vnetPort) readResult(fb *frameBatch) error {
	if p.rerr != nil && len(fb.frames) == 0 {
		if errors.Is(p.rerr, unix.EBADFD) {
			return os.ErrClosed
		}
		return os.NewSyscallError("read", p.rerr)
	}
	return nil
}

// readCall is read's netpoller callback: it takes the lock and reads what is ready; if
// that is nothing it lets go of the lock and waits (the inbound loop may have read it
// first, with readNow), else it returns holding the lock.
func (p *vnetPort) readCall(fd uintptr) bool {
	p.rlock.Lock()
	p.cur = p.rbatch
	p.readAvailable(fd)
	if len(p.rbatch.frames) == 0 && p.rerr == nil {
		p.rlock.Unlock()
		return false
	}
	return true
}

// readAvailable reads frames into p.cur until the device has no more, the batch is full
// or a read fails (in p.rerr). The caller holds the outbound lock.
func (p *vnetPort) readAvailable(fd uintptr) {
	fb := p.cur
	fb.frames, p.rerr = fb.frames[:0], nil
	for len(fb.frames) < len(fb.bufs) {
		buf := fb.bufs[len(fb.frames)]
		n, err := unix.Read(int(fd), buf)
		if err == unix.EAGAIN || err == unix.EINTR {
			return
		}
		if err != nil {
			p.rerr = err
			return
		}
		if n < virtioNetHdrLen {
			continue
		}
		f := tunFrame{pkt: buf[virtioNetHdrLen:n]}
		f.hdr.decode(buf)
		fb.frames = append(fb.frames, f)
	}
}

// writev writes p.iovs[:n] as one packet.
func (p *vnetPort) writev(n int) error {
	p.wn, p.werrno = n, 0
	if err := p.raw.Write(p.wcall); err != nil {
		return err
	}
	if p.werrno != 0 {
		return p.werrno
	}
	return nil
}

// writevCall is writev's netpoller callback.
func (p *vnetPort) writevCall(fd uintptr) bool {
	_, _, e := unix.Syscall(unix.SYS_WRITEV, fd, uintptr(unsafe.Pointer(&p.iovs[0])), uintptr(p.wn))
	if e == unix.EAGAIN {
		return false
	}
	p.werrno = e
	return true
}

func (p *vnetPort) setIovec(i int, b []byte) {
	p.iovs[i] = unix.Iovec{Base: &b[0]}
	p.iovs[i].SetLen(len(b))
}

// write coalesces consecutive TCP segments of one flow (see tcpRun) into super-packets and
// writes each super-packet, and each other packet, with one writev: its virtio header,
// the first packet, the payloads of the others. Nothing is copied.
func (p *vnetPort) write(pkts []innerPacket) error {
	var errs error
	for i := 0; i < len(pkts); {
		first := &pkts[i]
		j, run, psh := nextRun(pkts, i, p.coalesce.Load())
		if j-i == 1 {
			singleHeader(first, &p.vhead)
			p.vhead.encode(p.vhdr[:])
			p.setIovec(0, p.vhdr[:])
			p.setIovec(1, first.pkt)
			if err := p.writev(2); err != nil {
				errs = errors.Join(errs, err)
			}
			i = j
			continue
		}
		run.superHeader(first.pkt, run.bytes, psh, &p.vhead)
		p.vhead.encode(p.vhdr[:])
		p.setIovec(0, p.vhdr[:])
		p.setIovec(1, first.pkt)
		for k := i + 1; k < j; k++ {
			p.setIovec(2+k-i-1, pkts[k].pkt[run.hdrLen:])
		}
		err := p.writev(1 + j - i)
		if errors.Is(err, unix.EINVAL) {
			// The kernel does not take our super-packets: undo the header and write the
			// segments one by one, now and from now on.
			p.coalesce.Store(false)
			errs = errors.Join(errs, &errCoalesceFallback{err: err})
			restoreFirst(first.pkt, &run)
			if werr := p.write(pkts[i:j]); werr != nil {
				errs = errors.Join(errs, werr)
			}
		} else if err != nil {
			errs = errors.Join(errs, err)
		}
		i = j
	}
	return errs
}

// inject writes one packet with an empty virtio header (nothing offloaded).
func (p *vnetPort) inject(pkt []byte) error {
	buf := make([]byte, virtioNetHdrLen+len(pkt)) // rare: an ICMP error now and then
	copy(buf[virtioNetHdrLen:], pkt)
	var n int
	var werr error
	err := p.raw.Write(func(fd uintptr) bool {
		n, werr = unix.Write(int(fd), buf)
		return werr != unix.EAGAIN
	})
	if err == nil {
		err = werr
	}
	if err == nil && n != len(buf) {
		err = fmt.Errorf("short write of %d bytes", n)
	}
	return err
}

// restoreFirst undoes superHeader on the first packet of a run, so that it can be written
// alone.
func restoreFirst(pkt []byte, r *tcpRun) {
	size := r.hdrLen + r.mss
	if pkt[0]>>4 == 4 {
		pkt[2], pkt[3] = byte(size>>8), byte(size)
		setIPv4HeaderChecksum(pkt, r.ipHdrLen)
	} else {
		pkt[4], pkt[5] = byte((size-40)>>8), byte(size-40)
	}
	pkt[r.ipHdrLen+13] &^= tcpFlagPSH // the first packet of a run never had it
	setPartialChecksum(pkt[:size], r.ipHdrLen, ipProtoTCP, tcpCsumOffset)
}

// plainPort reads and writes packets one by one through a tun.Device without virtio
// headers: a TUN device without offloads, or the in-process fake of the tests.
type plainPort struct {
	dev  tun.Device
	mtu  int
	bufs [][]byte // write scratch, used under the inbound lock (packetPath.inMu)
}

func (p *plainPort) newFrameBatch() *frameBatch { return newFrameBatch(p.dev.BatchSize(), p.mtu) }

// readNow reads nothing: a tun.Device has no read that does not wait.
func (p *plainPort) readNow(fb *frameBatch) error {
	fb.frames = fb.frames[:0]
	return nil
}

func (p *plainPort) readsNow() bool { return false }

func (p *plainPort) read(fb *frameBatch, lock *sync.Mutex) error {
	n, err := p.dev.Read(fb.bufs, fb.sizes, 0)
	lock.Lock()
	fb.frames = fb.frames[:0]
	for i := 0; i < n; i++ {
		fb.frames = append(fb.frames, tunFrame{pkt: fb.bufs[i][:fb.sizes[i]]})
	}
	if n > 0 && errors.Is(err, tun.ErrTooManySegments) {
		err = nil
	}
	return err
}

func (p *plainPort) inject(pkt []byte) error {
	_, err := p.dev.Write([][]byte{pkt}, 0)
	return err
}

// write completes partial checksums in software (this kernel path cannot take them) and
// writes the packets.
func (p *plainPort) write(pkts []innerPacket) error {
	p.bufs = p.bufs[:0]
	for i := range pkts {
		if pkts[i].partial && !completeChecksum(pkts[i].pkt) {
			continue
		}
		p.bufs = append(p.bufs, pkts[i].pkt)
	}
	if len(p.bufs) == 0 {
		return nil
	}
	_, err := p.dev.Write(p.bufs, 0)
	return err
}

// openPlainTUN creates a TUN device without virtio headers, hence without offloads, as
// the tun package would with them.
func openPlainTUN(name string, mtu int) (tun.Device, error) {
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		unix.Close(fd)
		return nil, err
	}
	ifr.SetUint16(unix.IFF_TUN | unix.IFF_NO_PI)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		unix.Close(fd)
		return nil, err
	}
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		return nil, err
	}
	return tun.CreateTUNFromFile(os.NewFile(uintptr(fd), "/dev/net/tun"), mtu)
}

// checkDevice says why ciped cannot make its interface under the name asked for, if an
// interface of that name exists already (a name with %d lets the kernel pick a free
// one): ciped makes its own TUN device and removes it when it stops, so it neither takes
// over a persistent one (`ip tuntap add`; it would leave it configured), nor one that
// another process holds, nor an interface of another kind.
func checkDevice(name string) error {
	if strings.Contains(name, "%") {
		return nil
	}
	if _, err := net.InterfaceByName(name); err != nil {
		return nil // none of that name
	}
	flags, err := os.ReadFile(filepath.Join("/sys/class/net", name, "tun_flags"))
	if err != nil {
		kind := linkKind(name)
		if kind == "" {
			kind = "another kind"
		}
		return usagef("device %q exists and is not a TUN device (it is %s)", name, kind).
			withHint("choose another name (device=...), or leave device out to get the first free cipcbN")
	}
	if f, err := strconv.ParseUint(strings.TrimSpace(string(flags)), 0, 32); err == nil && f&unix.IFF_PERSIST != 0 {
		return usagef("device %q exists as a persistent TUN device (made by ip tuntap add); ciped makes its own", name).
			withHint("remove it (ip link delete %s), or choose another name", name)
	}
	return usagef("device %q is in use by another process (another ciped? see: ciped status %s)", name, name)
}
