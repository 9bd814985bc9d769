package main

// Interface configuration over rtnetlink: point-to-point address, route metric, link up.
// The tun package creates the device and sets its MTU; the rest is ours.

import (
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"unsafe"

	"golang.org/x/sys/unix"
)

// netlinkRequest sends one rtnetlink request and waits for its acknowledgement.
func netlinkRequest(msgType uint16, flags uint16, body []byte) error {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_ROUTE)
	if err != nil {
		return os.NewSyscallError("socket", err)
	}
	defer unix.Close(fd)
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return os.NewSyscallError("bind", err)
	}
	msg := make([]byte, unix.SizeofNlMsghdr, unix.SizeofNlMsghdr+len(body))
	msg = append(msg, body...)
	hdr := (*unix.NlMsghdr)(unsafe.Pointer(&msg[0]))
	*hdr = unix.NlMsghdr{Len: uint32(len(msg)), Type: msgType, Flags: unix.NLM_F_REQUEST | unix.NLM_F_ACK | flags, Seq: 1}
	if err := unix.Sendto(fd, msg, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return os.NewSyscallError("sendto", err)
	}
	buf := make([]byte, 4096)
	for {
		n, _, err := unix.Recvfrom(fd, buf, 0)
		if err != nil {
			return os.NewSyscallError("recvfrom", err)
		}
		for b := buf[:n]; len(b) >= unix.SizeofNlMsghdr; {
			h := (*unix.NlMsghdr)(unsafe.Pointer(&b[0]))
			if h.Len < unix.SizeofNlMsghdr || int(h.Len) > len(b) {
				return fmt.Errorf("malformed netlink reply")
			}
			data := b[unix.SizeofNlMsghdr:h.Len]
			if h.Type == unix.NLMSG_ERROR && h.Seq == 1 {
				if len(data) < 4 {
					return fmt.Errorf("short netlink error message")
				}
				if code := int32(binary.NativeEndian.Uint32(data[:4])); code != 0 {
					return unix.Errno(-code)
				}
				return nil
			}
			b = b[min(len(b), int((h.Len+unix.NLMSG_ALIGNTO-1)&^(unix.NLMSG_ALIGNTO-1))):]
		}
	}
}

// rtattr appends one route attribute.
func rtattr(b []byte, typ uint16, data []byte) []byte {
	l := unix.SizeofRtAttr + len(data)
	b = binary.NativeEndian.AppendUint16(b, uint16(l))
	b = binary.NativeEndian.AppendUint16(b, typ)
	b = append(b, data...)
	for len(b)%unix.RTA_ALIGNTO != 0 {
		b = append(b, 0)
	}
	return b
}

func ifIndex(name string) (int, error) {
	ifc, err := net.InterfaceByName(name)
	if err != nil {
		return 0, err
	}
	return ifc.Index, nil
}

// setLinkUp sets the interface administratively up.
func setLinkUp(index int) error {
	msg := unix.IfInfomsg{Family: unix.AF_UNSPEC, Index: int32(index), Flags: unix.IFF_UP, Change: unix.IFF_UP}
	body := (*[unix.SizeofIfInfomsg]byte)(unsafe.Pointer(&msg))[:]
	if err := netlinkRequest(unix.RTM_NEWLINK, 0, body); err != nil {
		return fmt.Errorf("set link up: %w", err)
	}
	return nil
}

// addressRequest builds the body of RTM_NEWADDR / RTM_DELADDR for local (with peer, if
// valid) on the interface; metric >= 0 sets the prefix route's metric.
func addressRequest(index int, local, peer netip.Addr, metric int) []byte {
	family, bits := unix.AF_INET, 32
	if local.Is6() {
		family, bits = unix.AF_INET6, 128
	}
	msg := unix.IfAddrmsg{Family: uint8(family), Prefixlen: uint8(bits), Index: uint32(index)}
	body := append([]byte(nil), (*[unix.SizeofIfAddrmsg]byte)(unsafe.Pointer(&msg))[:]...)
	body = rtattr(body, unix.IFA_LOCAL, local.AsSlice())
	if peer.IsValid() {
		body = rtattr(body, unix.IFA_ADDRESS, peer.AsSlice())
	} else {
		body = rtattr(body, unix.IFA_ADDRESS, local.AsSlice())
	}
	if local.Is6() {
		body = rtattr(body, unix.IFA_FLAGS, binary.NativeEndian.AppendUint32(nil, unix.IFA_F_NODAD))
	}
	if metric >= 0 {
		body = rtattr(body, unix.IFA_RT_PRIORITY, binary.NativeEndian.AppendUint32(nil, uint32(metric)))
	}
	return body
}

// addAddress gives the interface its tunnel address: "local peer PEER" when the peer is
// known, else local alone (a /32 or /128).
func addAddress(index int, local, peer netip.Addr, metric int) error {
	if err := netlinkRequest(unix.RTM_NEWADDR, unix.NLM_F_CREATE|unix.NLM_F_EXCL, addressRequest(index, local, peer, metric)); err != nil {
		return fmt.Errorf("add address %s: %w", local, err)
	}
	return nil
}

// deleteAddress removes an address added by addAddress.
func deleteAddress(index int, local, peer netip.Addr) error {
	if err := netlinkRequest(unix.RTM_DELADDR, 0, addressRequest(index, local, peer, -1)); err != nil {
		return fmt.Errorf("delete address %s: %w", local, err)
	}
	return nil
}

// deviceMTUTo is the MTU of the interface the kernel sends to dst through (the route's
// device, never a path MTU the network reported); 0 if it cannot tell.
func deviceMTUTo(dst netip.Addr) int {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_ROUTE)
	if err != nil {
		return 0
	}
	defer unix.Close(fd)
	family, bits := uint8(unix.AF_INET), uint8(32)
	if dst.Is6() {
		family, bits = unix.AF_INET6, 128
	}
	msg := unix.RtMsg{Family: family, Dst_len: bits}
	body := rtattr(append([]byte(nil), (*[unix.SizeofRtMsg]byte)(unsafe.Pointer(&msg))[:]...), unix.RTA_DST, dst.AsSlice())
	req := make([]byte, unix.SizeofNlMsghdr, unix.SizeofNlMsghdr+len(body))
	req = append(req, body...)
	*(*unix.NlMsghdr)(unsafe.Pointer(&req[0])) = unix.NlMsghdr{Len: uint32(len(req)), Type: unix.RTM_GETROUTE,
		Flags: unix.NLM_F_REQUEST, Seq: 1}
	if unix.Sendto(fd, req, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}) != nil {
		return 0
	}
	buf := make([]byte, 4096)
	n, _, err := unix.Recvfrom(fd, buf, 0)
	if err != nil {
		return 0
	}
	var routes []route
	if _, err := parseRouteMessages(buf[:n], &routes); err != nil || len(routes) != 1 || len(routes[0].oifs) == 0 {
		return 0
	}
	ifc, err := net.InterfaceByIndex(routes[0].oifs[0])
	if err != nil {
		return 0
	}
	return ifc.MTU
}

// linkKind names the kind of an interface as the kernel does (veth, bridge, wireguard,
// ...), or "" if it has none (a physical device) or cannot tell.
func linkKind(name string) string {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_ROUTE)
	if err != nil {
		return ""
	}
	defer unix.Close(fd)
	msg := unix.IfInfomsg{Family: unix.AF_UNSPEC}
	body := rtattr(append([]byte(nil), (*[unix.SizeofIfInfomsg]byte)(unsafe.Pointer(&msg))[:]...), unix.IFLA_IFNAME,
		append([]byte(name), 0))
	req := make([]byte, unix.SizeofNlMsghdr, unix.SizeofNlMsghdr+len(body))
	req = append(req, body...)
	*(*unix.NlMsghdr)(unsafe.Pointer(&req[0])) = unix.NlMsghdr{Len: uint32(len(req)), Type: unix.RTM_GETLINK,
		Flags: unix.NLM_F_REQUEST, Seq: 1}
	if unix.Sendto(fd, req, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}) != nil {
		return ""
	}
	buf := make([]byte, 1<<15)
	n, _, err := unix.Recvfrom(fd, buf, 0)
	if err != nil || n < unix.SizeofNlMsghdr+unix.SizeofIfInfomsg {
		return ""
	}
	h := (*unix.NlMsghdr)(unsafe.Pointer(&buf[0]))
	if h.Type != unix.RTM_NEWLINK || int(h.Len) > n {
		return ""
	}
	attrs := buf[unix.SizeofNlMsghdr+unix.SizeofIfInfomsg : h.Len]
	if info := findAttr(attrs, unix.IFLA_LINKINFO); info != nil {
		if kind := findAttr(info, unix.IFLA_INFO_KIND); kind != nil {
			return strings.TrimRight(string(kind), "\x00")
		}
	}
	return ""
}

// findAttr finds an attribute of a type among netlink attributes; nil if there is none.
func findAttr(b []byte, typ uint16) []byte {
	for len(b) >= unix.SizeofRtAttr {
		l := int(binary.NativeEndian.Uint16(b))
		if l < unix.SizeofRtAttr || l > len(b) {
			return nil
		}
		if binary.NativeEndian.Uint16(b[2:])&^unix.NLA_F_NESTED == typ {
			return b[unix.SizeofRtAttr:l]
		}
		b = b[min(len(b), (l+unix.RTA_ALIGNTO-1)&^(unix.RTA_ALIGNTO-1)):]
	}
	return nil
}
