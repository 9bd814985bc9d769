package main

// The attack suite: end to end, two ciped processes in namespaces and, where the attack
// needs one, a third, off-path attacker namespace on the carrier network. Each test
// asserts the outcome (the link stays up, nothing leaks, answers stay bounded, shutdown
// stays within its bound), never how long something took.

import (
	"fmt"
	"net"
	"os/exec"
	"testing"
	"time"
)

// TestAttackDSCPBursts: bursts of same-size inner packets with a DSCP mark (EF pings sent
// 16 at a time) and bursts of the kernel's own ICMP errors (TOS 0xc0) through the tunnel,
// over IPv4 and IPv6 carriers. Such a batch once overran the room for the control
// messages of a GSO send and killed ciped. Both ends must live, the traffic must pass,
// and the carrier packets must carry the marks.
func TestAttackDSCPBursts(t *testing.T) {
	requireRoot(t)
	for _, ipv6 := range []bool{false, true} {
		t.Run(fmt.Sprintf("ipv6-carrier=%v", ipv6), func(t *testing.T) {
			l := &e2eLink{}
			l.start(t, ipv6)
			l.waitUp(t)
			stop := make(chan struct{})
			frames := capture(t, l.ns.b, "ve1", stop)

			out, _ := exec.Command("ip", "netns", "exec", l.ns.a, "ping", "-n", "-q", "-Q", "0x20", "-l", "16",
				"-s", "16", "-c", "64", "-i", "0.01", "-W", "2", e2eTunnelB).CombinedOutput()
			// A burst of datagrams to a closed port: b's kernel answers each with an ICMP
			// port unreachable of TOS 0xc0, back through the tunnel, many in one batch.
			var c *net.UDPConn
			if err := inNetns(l.ns.a, func() (err error) {
				c, err = net.DialUDP("udp", nil, &net.UDPAddr{IP: net.ParseIP(e2eTunnelB), Port: 9})
				return err
			}); err != nil {
				t.Fatal(err)
			}
			for range 200 {
				c.Write(make([]byte, 20))
			}
			c.Close()
			time.Sleep(200 * time.Millisecond) // let the errors come back before the check
			close(stop)
			captured := <-frames

			for _, d := range []*daemon{l.a, l.b} {
				if !d.running() {
					t.Fatalf("%s died (status %d)", d.name, d.status)
				}
			}
			if got := ping(t, l.ns.a, e2eTunnelB, 3, "0.2"); got != 3 {
				t.Fatalf("after the bursts %d of 3 pings came back\nthe burst's ping said:\n%s", got, out)
			}
			if !ipv6 {
				marked := 0
				for _, p := range udpPackets(captured) {
					if p.src.Addr() == l.ns.carrierA && len(p.payload) > dataOverhead && p.tos == 0x20 {
						marked++
					}
				}
				if marked < 16 {
					t.Fatalf("%d carrier packets from a carried the EF pings' DSCP 0x20, want at least 16", marked)
				}
			}
		})
	}
}
