package main

// The inner source filter: a packet from the tunnel may only have a source address this
// host would route a reply to back through the tunnel (rpfilter). What the peer may
// claim is thus what the routes say (the peer's tunnel address, and what ip-up routes
// through the interface), with nothing to configure. The routes are read from the
// kernel over rtnetlink and kept current by its notifications, into an immutable table
// that the inbound loop consults with no system call, lock or allocation per packet.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"sync"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

const (
	routeSettle = 20 * time.Millisecond // notifications are let settle this long before a rebuild
	rtTableMain = 254                   // RT_TABLE_MAIN
	rtTableDflt = 253                   // RT_TABLE_DEFAULT
	rtTableLocl = 255                   // RT_TABLE_LOCAL
)

// routeTable answers whether a source address is routed through one interface: the
// longest matching route, in the tables the kernel's default rules consult (local, then
// main, then default), goes through it. It is immutable once built, and safe for
// concurrent use.
type routeTable struct {
	tables [3]routeFamilies // local, main, default
}

type routeFamilies struct{ v4, v6 []routeGroup }

// routeGroup is the routes of one prefix length: masked address → the route the kernel
// would take for it (the lowest metric) and whether it goes through the interface.
type routeGroup struct {
	bits   int
	routes map[[16]byte]routeChoice
}

type routeChoice struct {
	metric uint32
	via    bool
}

// allows reports whether a reply to src would leave through the interface.
func (t *routeTable) allows(src netip.Addr) bool {
	for i := range t.tables {
		groups := t.tables[i].v4
		if src.Is6() {
			groups = t.tables[i].v6
		}
		for j := range groups {
			g := &groups[j]
			p, err := src.Prefix(g.bits)
			if err != nil {
				continue
			}
			if r, ok := g.routes[p.Addr().As16()]; ok {
				return r.via
			}
		}
	}
	return false
}

// route is one route as the kernel reports it.
type route struct {
	table   int
	dst     netip.Prefix
	metric  uint32 // the lowest wins among routes to one prefix
	unicast bool   // a unicast route (not local, broadcast, blackhole, unreachable, ...)
	oifs    []int  // the interfaces its next hops leave through
}

// buildRouteTable makes the table for the interface ifindex from the kernel's routes.
func buildRouteTable(routes []route, ifindex int) *routeTable {
	t := &routeTable{}
	for _, r := range routes {
		var fam *routeFamilies
		switch r.table {
		case rtTableLocl:
			fam = &t.tables[0]
		case rtTableMain:
			fam = &t.tables[1]
		case rtTableDflt:
			fam = &t.tables[2]
		default:
			continue // policy routing's own tables are not consulted
		}
		groups := &fam.v4
		if r.dst.Addr().Is6() {
			groups = &fam.v6
		}
		i := slices.IndexFunc(*groups, func(g routeGroup) bool { return g.bits == r.dst.Bits() })
		if i < 0 {
			*groups = append(*groups, routeGroup{bits: r.dst.Bits(), routes: map[[16]byte]routeChoice{}})
			i = len(*groups) - 1
		}
		key := r.dst.Masked().Addr().As16()
		via := r.unicast && slices.Contains(r.oifs, ifindex) // multipath: any hop through us
		old, seen := (*groups)[i].routes[key]
		switch {
		case !seen || r.metric < old.metric: // the kernel takes the lowest metric
			(*groups)[i].routes[key] = routeChoice{metric: r.metric, via: via}
		case r.metric == old.metric:
			(*groups)[i].routes[key] = routeChoice{metric: r.metric, via: old.via || via}
		}
	}
	for i := range t.tables {
		for _, g := range []*[]routeGroup{&t.tables[i].v4, &t.tables[i].v6} {
			slices.SortFunc(*g, func(a, b routeGroup) int { return b.bits - a.bits })
		}
	}
	return t
}

// dumpRoutes reads every IPv4 and IPv6 route of this network namespace.
func dumpRoutes() ([]route, error) {
	var all []route
	for _, family := range []uint8{unix.AF_INET, unix.AF_INET6} {
		rs, err := dumpRoutesOf(family)
		if err != nil {
			return nil, err
		}
		all = append(all, rs...)
	}
	return all, nil
}

func dumpRoutesOf(family uint8) ([]route, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_ROUTE)
	if err != nil {
		return nil, os.NewSyscallError("socket", err)
	}
	defer unix.Close(fd)
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return nil, os.NewSyscallError("bind", err)
	}
	req := make([]byte, unix.SizeofNlMsghdr+unix.SizeofRtMsg)
	*(*unix.NlMsghdr)(unsafe.Pointer(&req[0])) = unix.NlMsghdr{Len: uint32(len(req)), Type: unix.RTM_GETROUTE,
		Flags: unix.NLM_F_REQUEST | unix.NLM_F_DUMP, Seq: 1}
	req[unix.SizeofNlMsghdr] = family
	if err := unix.Sendto(fd, req, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return nil, os.NewSyscallError("sendto", err)
	}
	var routes []route
	buf := make([]byte, 1<<16)
	for {
		n, _, err := unix.Recvfrom(fd, buf, 0)
		if err != nil {
			return nil, os.NewSyscallError("recvfrom", err)
		}
		done, err := parseRouteMessages(buf[:n], &routes)
		if err != nil || done {
			return routes, err
		}
	}
}

// parseRouteMessages appends the routes of a batch of rtnetlink messages; done reports
// the end of a dump.
func parseRouteMessages(b []byte, routes *[]route) (done bool, err error) {
	for len(b) >= unix.SizeofNlMsghdr {
		h := (*unix.NlMsghdr)(unsafe.Pointer(&b[0]))
		if h.Len < unix.SizeofNlMsghdr || int(h.Len) > len(b) {
			return false, errors.New("malformed netlink message")
		}
		data := b[unix.SizeofNlMsghdr:h.Len]
		switch h.Type {
		case unix.NLMSG_DONE:
			return true, nil
		case unix.NLMSG_ERROR:
			if len(data) >= 4 {
				if code := int32(binary.NativeEndian.Uint32(data)); code != 0 {
					return false, unix.Errno(-code)
				}
			}
		case unix.RTM_NEWROUTE:
			if r, ok := parseRoute(data); ok {
				*routes = append(*routes, r)
			}
		}
		b = b[min(len(b), int((h.Len+unix.NLMSG_ALIGNTO-1)&^(unix.NLMSG_ALIGNTO-1))):]
	}
	return false, nil
}

// parseRoute reads one struct rtmsg and its attributes.
func parseRoute(b []byte) (route, bool) {
	if len(b) < unix.SizeofRtMsg {
		return route{}, false
	}
	m := (*unix.RtMsg)(unsafe.Pointer(&b[0]))
	bytesLen := 4
	if m.Family == unix.AF_INET6 {
		bytesLen = 16
	} else if m.Family != unix.AF_INET {
		return route{}, false
	}
	r := route{table: int(m.Table), unicast: m.Type == unix.RTN_UNICAST}
	var dst []byte
	for a := b[unix.SizeofRtMsg:]; len(a) >= unix.SizeofRtAttr; {
		l := int(binary.NativeEndian.Uint16(a))
		typ := binary.NativeEndian.Uint16(a[2:])
		if l < unix.SizeofRtAttr || l > len(a) {
			return route{}, false
		}
		v := a[unix.SizeofRtAttr:l]
		switch typ {
		case unix.RTA_DST:
			dst = v
		case unix.RTA_TABLE:
			if len(v) >= 4 {
				r.table = int(binary.NativeEndian.Uint32(v))
			}
		case unix.RTA_OIF:
			if len(v) >= 4 {
				r.oifs = append(r.oifs, int(binary.NativeEndian.Uint32(v)))
			}
		case unix.RTA_PRIORITY:
			if len(v) >= 4 {
				r.metric = binary.NativeEndian.Uint32(v)
			}
		case unix.RTA_MULTIPATH:
			for nh := v; len(nh) >= unix.SizeofRtNexthop; {
				n := (*unix.RtNexthop)(unsafe.Pointer(&nh[0]))
				if int(n.Len) < unix.SizeofRtNexthop || int(n.Len) > len(nh) {
					break
				}
				r.oifs = append(r.oifs, int(n.Ifindex))
				nh = nh[min(len(nh), (int(n.Len)+3)&^3):]
			}
		}
		a = a[min(len(a), (l+unix.RTA_ALIGNTO-1)&^(unix.RTA_ALIGNTO-1)):]
	}
	addr := netip.IPv4Unspecified()
	if bytesLen == 16 {
		addr = netip.IPv6Unspecified()
	}
	if dst != nil {
		a, ok := netip.AddrFromSlice(dst)
		if !ok || len(dst) != bytesLen {
			return route{}, false
		}
		addr = a
	}
	if int(m.Dst_len) > 8*bytesLen {
		return route{}, false
	}
	r.dst = netip.PrefixFrom(addr, int(m.Dst_len))
	return r, true
}

// routeWatcher keeps a routeTable for one interface current. Make one with watchRoutes;
// its table is published through the pointer it was given.
type routeWatcher struct {
	ifindex int
	publish func(*routeTable)
	log     *logger
	sock    *os.File
	mu      sync.Mutex // serialises rebuilds
	done    chan struct{}
}

// watchRoutes reads the routes now, publishes the table for the interface and keeps it
// current until close. A failure to read them at start is an error.
func watchRoutes(ifindex int, publish func(*routeTable), log *logger) (*routeWatcher, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("route notifications: %w", os.NewSyscallError("socket", err))
	}
	groups := uint32(unix.RTMGRP_IPV4_ROUTE | unix.RTMGRP_IPV6_ROUTE)
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK, Groups: groups}); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("route notifications: %w", os.NewSyscallError("bind", err))
	}
	w := &routeWatcher{ifindex: ifindex, publish: publish, log: log, sock: os.NewFile(uintptr(fd), "rtnetlink"),
		done: make(chan struct{})}
	if err := w.refresh(); err != nil { // after subscribing: no change can slip between
		w.sock.Close()
		return nil, err
	}
	go w.routineWatch()
	return w, nil
}

// refresh reads the routes and publishes a new table.
func (w *routeWatcher) refresh() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	routes, err := dumpRoutes()
	if err != nil {
		return fmt.Errorf("reading the routes: %w", err)
	}
	w.publish(buildRouteTable(routes, w.ifindex))
	return nil
}

// routineWatch rebuilds the table after each burst of route notifications (and after
// the socket overflowed: some were lost).
func (w *routeWatcher) routineWatch() {
	defer close(w.done)
	buf := make([]byte, 1<<16)
	for {
		if _, err := w.sock.Read(buf); err != nil && !errors.Is(err, unix.ENOBUFS) {
			return // closed
		}
		// Let a burst (ip-up adding routes) settle, then read them all at once.
		w.sock.SetReadDeadline(time.Now().Add(routeSettle))
		for {
			if _, err := w.sock.Read(buf); err != nil && !errors.Is(err, unix.ENOBUFS) {
				break
			}
		}
		w.sock.SetReadDeadline(time.Time{})
		if err := w.refresh(); err != nil {
			w.log.Printf("rpfilter: %v (keeping the last routes)", err)
		}
	}
}

// close stops the watcher.
func (w *routeWatcher) close() {
	w.sock.Close()
	<-w.done
}
