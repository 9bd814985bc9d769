package main

// Path MTU: how large a message the path to the peer takes, found the way RFC 8899
// ("datagram PLPMTUD") finds it: with authenticated probes of the sizes in question
// (PROTOCOL.md §4.6), never by believing the network. An ICMP "too big" only starts a
// search; the size goes down only when a probe of the larger size went unanswered, and
// never below the protocol's floor; a size that fails without any ICMP (a black hole) is
// found by confirming the current size now and then; and the size goes up again when a
// larger probe gets through. The control loop owns the prober.

import (
	"slices"
	"time"
)

const (
	probeRounds  = 3                      // a size not acknowledged in this many rounds does not fit
	probeWait    = 500 * time.Millisecond // how long a round waits for acknowledgements, at most
	probeWaitMin = 20 * time.Millisecond  // ... and at least (the wait is 4 round trips once one is measured)
	probeConfirm = time.Minute            // the current size is confirmed this often while traffic flows
	hintHoldoff  = time.Second            // after a search that proved a hint wrong, hints wait this long
	floorIPv4    = 576                    // the smallest IPv4 packet every host takes (RFC 791, RFC 1122)
	floorIPv6    = 1280                   // the smallest IPv6 link MTU (RFC 8200)
)

// pathPlateaus are the IP packet sizes common on the way (RFC 1191's table, with today's
// tunnels added), tried when a size fails and no report says which one fits.
var pathPlateaus = []int{1500, 1492, 1480, 1460, 1440, 1420, 1400, 1380, 1360, 1320, 1280, 1200, 1006, 576}

// pathProber searches for the largest message (UDP payload, a whole ciped message) the
// path takes. Sizes are message sizes; header is what the carrier adds (IP, UDP, SOCKS).
// It is not safe for concurrent use: the control loop owns it.
type pathProber struct {
	header     int // carrier bytes around a message
	floor, max int // the smallest size ever assumed, the largest ever needed
	current    int // the largest size known to fit (the packet path's limit)
	trusting   bool

	probing    []int // the sizes of the search under way, largest first; empty: none
	acked      int   // the largest size acknowledged in this search
	round      int   // rounds sent
	roundAt    time.Time
	rtt        time.Duration // the smoothed round trip of probes; 0: none measured yet
	plateaus   bool          // the search covers the plateaus already
	hintsAfter time.Time     // hints are ignored before this
	confirmAt  time.Time     // when the current size is next confirmed
}

// newPathProber makes a prober for messages of up to max bytes over a carrier that adds
// header bytes, of IP version 6 or 4. trusting (nokey, which cannot probe) believes
// reports instead.
func newPathProber(max, header int, ipv6, trusting bool) *pathProber {
	floor := floorIPv4 - header
	if ipv6 {
		floor = floorIPv6 - header
	}
	floor = min(floor, max)
	return &pathProber{header: header, floor: floor, max: max, current: max, trusting: trusting}
}

// start begins the life of a link that came up: confirm the current size at once. fresh
// says the path is another than the one the size was found on (a new peer address): the
// search starts from the largest size again.
func (p *pathProber) start(now time.Time, fresh bool) {
	p.abort()
	if fresh {
		p.current = p.max
	}
	p.search(now, p.current)
}

// abort ends a search without a result (the link went down).
func (p *pathProber) abort() {
	p.probing, p.acked, p.round, p.plateaus = nil, 0, 0, false
}

// hint takes a size the network reported (an IP packet size, from ICMP): it starts a
// search that probes the current size and the reported one, unless the last search
// proved such a report wrong a moment ago. local is our own kernel's word (the
// interface's MTU): that is believed, and bounds every later size.
func (p *pathProber) hint(now time.Time, mtu int, local bool) {
	size := mtu - p.header
	if local {
		if size < p.max {
			p.max = max(size, p.floor)
			p.conclude(now, min(p.current, p.max))
		}
		return
	}
	size = max(size, p.floor)
	if size >= p.current || now.Before(p.hintsAfter) {
		return
	}
	if p.trusting {
		p.conclude(now, size)
		return
	}
	p.search(now, p.current, size)
}

// grow probes for a larger size, if the current one is below the largest needed.
func (p *pathProber) grow(now time.Time) {
	if p.current < p.max && len(p.probing) == 0 && !p.trusting {
		sizes := []int{p.max}
		for _, pl := range pathPlateaus {
			if s := pl - p.header; s > p.current && s < p.max {
				sizes = append(sizes, s)
			}
		}
		p.search(now, sizes...)
	}
}

// search starts (or widens) a search over sizes.
func (p *pathProber) search(now time.Time, sizes ...int) {
	if p.trusting {
		return
	}
	for _, s := range sizes {
		if s = min(max(s, p.floor), p.max); !slices.Contains(p.probing, s) {
			p.probing = append(p.probing, s)
		}
	}
	slices.Sort(p.probing)
	slices.Reverse(p.probing)
	if p.round == 0 {
		p.roundAt = now
	}
}

// ack records that the peer received a probe of size bytes (at now).
func (p *pathProber) ack(now time.Time, size int) {
	if !slices.Contains(p.probing, size) || p.round == 0 {
		return
	}
	p.acked = max(p.acked, size)
	if sample := now.Sub(p.roundAt); sample > 0 && sample < probeWait {
		if p.rtt == 0 {
			p.rtt = sample
		} else {
			p.rtt += (sample - p.rtt) / 8
		}
	}
}

// wait is how long a round waits for acknowledgements: four round trips once one is
// known, within probeWaitMin and probeWait.
func (p *pathProber) wait() time.Duration {
	if p.rtt == 0 {
		return probeWait
	}
	return min(probeWait, max(probeWaitMin, 4*p.rtt))
}

// tick moves the search on: it returns the sizes to probe now (nil: none). busy says
// whether traffic flows, so that the current size is worth confirming.
func (p *pathProber) tick(now time.Time, busy bool) []int {
	if len(p.probing) == 0 {
		if busy && !p.trusting && !now.Before(p.confirmAt) {
			p.search(now, p.current)
		} else {
			return nil
		}
	}
	if p.round > 0 && now.Before(p.roundAt.Add(p.wait())) {
		return nil
	}
	if p.round > 0 {
		switch {
		case p.acked >= p.probing[0]:
			p.conclude(now, p.acked)
			return nil
		case p.round < probeRounds:
		case p.acked > 0:
			p.conclude(now, p.acked)
			return nil
		case !p.plateaus:
			// Not even the sizes in question: try the common ones, down to the floor.
			p.plateaus = true
			low := p.probing[len(p.probing)-1]
			var more []int
			for _, pl := range pathPlateaus {
				if s := pl - p.header; s < low && s >= p.floor {
					more = append(more, s)
				}
			}
			p.search(now, append(more, p.floor)...)
			p.round = 0
		default:
			// Nothing got through, down to the floor: the peer is away, not the path
			// smaller (liveness decides about that). Keep what we had.
			p.conclude(now, p.current)
			return nil
		}
	}
	p.round++
	p.roundAt = now
	var send []int
	for _, s := range p.probing {
		if s > p.acked {
			send = append(send, s)
		}
	}
	return send
}

// nextAt is when tick next has something to do during a search (zero: no search).
func (p *pathProber) nextAt() time.Time {
	if len(p.probing) == 0 {
		return time.Time{}
	}
	return p.roundAt.Add(p.wait())
}

// conclude ends a search with size as the largest that fits.
func (p *pathProber) conclude(now time.Time, size int) {
	if len(p.probing) > 0 && size >= p.current {
		// The size in question got through: a report of a smaller one that came
		// meanwhile, or that started the search, was wrong.
		p.hintsAfter = now.Add(hintHoldoff)
	}
	p.current = min(max(size, p.floor), p.max)
	p.probing, p.acked, p.round, p.plateaus = nil, 0, 0, false
	p.confirmAt = now.Add(probeConfirm)
}
