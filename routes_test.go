package main

import (
	"net/netip"
	"os/exec"
	"strings"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

// TestRouteTable: a source is allowed when its longest matching route, in the local
// table, then main, then default, goes through the interface (here 7).
func TestRouteTable(t *testing.T) {
	p := netip.MustParsePrefix
	routes := []route{
		{table: rtTableLocl, dst: p("10.99.0.2/32")},                                  // our own tunnel address
		{table: rtTableLocl, dst: p("127.0.0.0/8")},                                   // loopback
		{table: rtTableMain, dst: p("10.99.0.1/32"), unicast: true, oifs: []int{7}},   // the peer
		{table: rtTableMain, dst: p("192.168.2.0/24"), unicast: true, oifs: []int{7}}, // ip-up's route
		{table: rtTableMain, dst: p("192.168.2.128/25"), unicast: true, oifs: []int{3}},
		{table: rtTableMain, dst: p("0.0.0.0/0"), unicast: true, oifs: []int{3}},
		{table: rtTableMain, dst: p("172.16.0.0/12"), unicast: true, oifs: []int{3, 7}}, // multipath
		{table: rtTableMain, dst: p("172.16.9.0/24"), unicast: false, oifs: []int{7}},   // unreachable
		{table: rtTableDflt, dst: p("198.51.100.0/24"), unicast: true, oifs: []int{7}},  // default table
		{table: 100, dst: p("203.0.113.0/24"), unicast: true, oifs: []int{7}},           // policy table: ignored
		{table: rtTableMain, dst: p("100.64.0.0/10"), metric: 100, unicast: true, oifs: []int{3}},
		{table: rtTableMain, dst: p("100.64.0.0/10"), metric: 1000, unicast: true, oifs: []int{7}}, // a backup
		{table: rtTableMain, dst: p("100.96.0.0/11"), metric: 1000, unicast: true, oifs: []int{7}},
		{table: rtTableMain, dst: p("100.96.0.0/11"), metric: 10, unicast: true, oifs: []int{3}},
		{table: rtTableMain, dst: p("fd00::1/128"), unicast: true, oifs: []int{7}},
		{table: rtTableMain, dst: p("fe80::/64"), unicast: true, oifs: []int{7}},
		{table: rtTableMain, dst: p("::/0"), unicast: true, oifs: []int{3}},
	}
	table := buildRouteTable(routes, 7)
	for _, c := range []struct {
		src string
		ok  bool
	}{
		{"10.99.0.1", true}, {"10.99.0.2", false}, {"127.0.0.1", false},
		{"192.168.2.5", true}, {"192.168.2.200", false}, {"192.0.2.55", false},
		{"172.20.1.1", true}, {"172.16.9.9", false},
		{"198.51.100.7", false}, // main's default route matches first
		{"203.0.113.5", false},
		{"100.64.1.1", false}, {"100.100.1.1", false}, // a backup route through the tunnel is not the one taken
		{"fd00::1", true}, {"fd00::2", false}, {"fe80::1234", true}, {"2001:db8:bad::1", false},
	} {
		if got := table.allows(netip.MustParseAddr(c.src)); got != c.ok {
			t.Errorf("%s: allowed %v, want %v", c.src, got, c.ok)
		}
	}
	// Without a default route in main, the default table decides.
	noDefault := buildRouteTable(append(routes[:5:5], routes[8]), 7) // the default table's 198.51.100.0/24
	if !noDefault.allows(netip.MustParseAddr("198.51.100.7")) {
		t.Error("the default table is not consulted after main")
	}
}

// TestRouteTableLookupsDoNotAllocate: the inbound loop asks for each packet.
func TestRouteTableLookupsDoNotAllocate(t *testing.T) {
	table := buildRouteTable([]route{{table: rtTableMain, dst: netip.MustParsePrefix("10.0.0.0/8"), unicast: true, oifs: []int{1}}}, 1)
	in := &inbound{filter: table}
	pkt := innerForBuilder(false, 60, 64, 0, false)
	if allocs := testing.AllocsPerRun(100, func() {
		pkt[15]++ // another source each time: no cache hit
		in.sourceAllowed(pkt)
	}); allocs != 0 {
		t.Fatalf("%v allocations per lookup", allocs)
	}
}

// TestDumpRoutes: the routes read from a real kernel, in a namespace of its own, are
// those `ip route` shows, with their tables, types and interfaces.
func TestDumpRoutes(t *testing.T) {
	requireRoot(t)
	ns := newNetnsPair(t, false)
	mustRun(t, "ip", "-n", ns.a, "route", "add", "192.168.77.0/24", "dev", "ve0")
	mustRun(t, "ip", "-n", ns.a, "route", "add", "unreachable", "192.168.78.0/24")
	mustRun(t, "ip", "-n", ns.a, "-6", "addr", "add", "2001:db8:99::1/64", "dev", "ve0", "nodad")
	var routes []route
	var ifindex int
	if err := inNetns(ns.a, func() (err error) {
		if ifindex, err = ifIndex("ve0"); err != nil {
			return err
		}
		routes, err = dumpRoutes()
		return err
	}); err != nil {
		t.Fatal(err)
	}
	table := buildRouteTable(routes, ifindex)
	for _, c := range []struct {
		src string
		ok  bool
	}{{"192.168.77.9", true}, {"198.18.0.2", true}, {"192.168.78.1", false}, {"198.18.0.1", false},
		{"2001:db8:99::5", true}, {"10.1.1.1", false}} {
		if got := table.allows(netip.MustParseAddr(c.src)); got != c.ok {
			out, _ := exec.Command("ip", "-n", ns.a, "route", "show", "table", "all").CombinedOutput()
			t.Errorf("%s: allowed %v, want %v; routes:\n%s", c.src, got, c.ok, strings.TrimSpace(string(out)))
		}
	}
}

// FuzzRouteMessages: whatever the route messages hold, parsing them does not panic, and
// every route it takes has a valid prefix.
func FuzzRouteMessages(f *testing.F) {
	msg := make([]byte, unix.SizeofNlMsghdr+unix.SizeofRtMsg)
	*(*unix.NlMsghdr)(unsafe.Pointer(&msg[0])) = unix.NlMsghdr{Len: uint32(len(msg) + 8 + 8), Type: unix.RTM_NEWROUTE}
	msg[unix.SizeofNlMsghdr], msg[unix.SizeofNlMsghdr+1] = unix.AF_INET, 24
	msg = append(msg, 8, 0, unix.RTA_DST, 0, 10, 1, 2, 0, 8, 0, unix.RTA_OIF, 0, 7, 0, 0, 0)
	f.Add(msg)
	f.Fuzz(func(t *testing.T, b []byte) {
		var routes []route
		parseRouteMessages(b, &routes)
		for _, r := range routes {
			if !r.dst.IsValid() {
				t.Fatalf("took a route with an invalid prefix: %+v", r)
			}
		}
		buildRouteTable(routes, 7).allows(netip.MustParseAddr("10.1.2.3"))
	})
}
