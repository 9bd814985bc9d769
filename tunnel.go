package main

// The packet path: one TUN device, one carrier socket, one peer. This file holds the two
// data loops, in packet order, and the small core they share with the control loop
// (link.go), which runs the link's life: key exchanges, timers, liveness, scripts, status.
//
// Outbound, RoutineReadFromTUN (one goroutine):
//  1. tunPort.read reads what the interface has ready: with offloads, up to four frames of
//     up to 64 KiB, each a TCP or UDP super-packet (or a plain packet) with its virtio
//     header.
//  2. One atomic load picks the current session; one atomic add per frame reserves its
//     counters.
//  3. The segmenter cuts each super-packet into inner packets in place, writing each
//     piece's headers just in front of its payload, and leaves the inner checksums
//     partial. Each inner packet is sealed from where it lies into the send arena (header,
//     ciphertext, tag): the copy and the encryption are one pass. Datagrams of one size
//     line up into GSO messages.
//  4. carrier.WriteBatch sends the arena with one sendmmsg, a GSO message per run of
//     datagrams: the kernel splits them late (or not at all across a veth).
//  5. After a batch of one or two packets (a ping, a request) on a link that has been
//     quiet inbound, watchForAnswer polls the carrier for up to answerWatch and handles
//     the answer itself, as the inbound loop would, sparing that loop's wake-up.
//
// Inbound, RoutineReadFromCarrier (one goroutine):
//  1. carrier.ReadBatch fills a batch of buffers with recvmmsg; with UDP GRO each message
//     holds many datagrams of one size.
//  2. Per datagram: key-exchange messages are copied to the control loop; a data message
//     finds its session among the three held (no other lookup), is opened in place, passes
//     the replay window, and its inner packet joins the write batch, where it lies.
//  3. tunPort.write coalesces consecutive TCP segments of one flow into super-packets and
//     writes each with one writev: virtio header, first packet, the others' payloads.
//  4. What the kernel answered within that write (an echo reply, TCP ACKs) is read and
//     sent at once (sendNow), sparing the outbound loop's wake-up.
//
// The two loops lend each other a hand in steps 5 and 4 only when the other is idle: each
// side's state has one lock (outbound.mu, packetPath.inMu), taken by its own loop for each
// read (and held through the batch) and only tried by the other. The one wait across
// loops: the inbound loop, woken by a datagram, waits while a watch handles it.
//
// The data loops and the control loop meet only at the core (below): the keyring, the
// peer's addresses, the liveness timestamps, the counters and two queues towards the
// control loop. Sessions are published through the keyring's atomic pointers; the
// inbound loop changes the keyring only to confirm a responder's new session, under the
// keyring's mutex, once per key exchange.
//
// Buffers: each loop allocates its buffers once and owns them for its whole life: the
// outbound loop its frame buffers and send arena, the inbound loop its receive buffers
// (and the answer watch has a few of its own). Nothing is allocated, locked or sent over
// a channel per packet on either path.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.zx2c4.com/wireguard/tun"
)

const (
	carrierBatch       = 128 // datagrams per recvmmsg without GRO
	parallelMinPackets = 16  // packets in a batch worth sealing or opening on two cores
	// parallelMinCores is where two-core crypto starts to pay: with fewer, both cores are
	// already busy with the two data loops (and the kernel's work for them), and the
	// helper's copy and hand-off cost more than they save (measured on 2 cores: 15% less
	// throughput, 20% more CPU per GB).
	parallelMinCores    = 4
	icmpPerSecond       = 20                    // ICMP "too big" messages we send at most
	groBatch            = 8                     // messages (of up to 64 datagrams) per recvmmsg with GRO
	outArenaSize        = 256 << 10             // bytes of sealed datagrams per sendmmsg
	exchangeQueueSize   = 64                    // key-exchange messages waiting for the control loop
	eventQueueSize      = 64                    // events from the data loops to the control loop
	logInterval         = 10 * time.Second      // at most one line per kind of bad packet
	version1LogInterval = time.Minute           // at most one line about a peer speaking version 1 (PROTOCOL.md §10)
	errorPause          = 10 * time.Millisecond // after an unexpected read error
	exchangeMessageSize = initiationPartSize    // the larger of the two parts (and of a version-1 initiation)

	// After the outbound loop sends a batch of at most answerWatchPackets packets, and
	// nothing came in for answerQuiet, it watches the carrier for an answer for up to
	// answerWatch, spinning, and handles the answer itself: that spares the wake-up of the
	// inbound loop, a good part of a round trip's time. A watch that sees nothing stops the
	// watching for a pause that starts at answerPauseMin and doubles with each such watch
	// up to answerPauseMax (traffic that gets no answers costs at most answerWatch per
	// answerPauseMax); an answer the watch catches ends it.
	answerWatch        = time.Millisecond
	answerWatchPackets = 2
	answerQuiet        = 2 * time.Millisecond
	answerPauseMin     = 10 * time.Millisecond
	answerPauseMax     = time.Second
)

// stats are the link's counters. They are updated once per batch and safe to read at
// any time.
type stats struct {
	txPackets, txBytes    atomic.Uint64 // inner packets and bytes sent
	rxPackets, rxBytes    atomic.Uint64 // inner packets and bytes received
	dropNoSession         atomic.Uint64 // outbound packets with no session (or no peer) to send them
	dropAuth              atomic.Uint64 // data messages that failed authentication
	dropReplay            atomic.Uint64 // data messages that were replays
	dropUnknown           atomic.Uint64 // data messages for no session we hold (or an expired one)
	dropMalformed         atomic.Uint64 // datagrams that are not a well-formed message
	dropTooBig            atomic.Uint64 // inner packets too big for the carrier path (answered with ICMP)
	dropSource            atomic.Uint64 // inner packets from the peer with a source not routed back through the tunnel
	dropExchange          atomic.Uint64 // key-exchange messages refused
	dropExchangeQueueFull atomic.Uint64 // key-exchange messages dropped because the queue was full
	carrierErrors         atomic.Uint64 // failed carrier sends and receives, and ICMP errors about datagrams to the peer
	carrierForeign        atomic.Uint64 // ICMP errors about datagrams we did not send to the peer (ignored)
	tunErrors             atomic.Uint64 // failed TUN reads and writes
	exchanges             atomic.Uint64 // completed key exchanges
	droppedEvents         atomic.Uint64 // events the control loop's queue had no room for
}

// summary is the one-line account of the counters logged at exit.
func (s *stats) summary() string {
	return fmt.Sprintf("sent %d packets (%d bytes), received %d packets (%d bytes), %d key exchanges; "+
		"dropped: %d without session, %d failed authentication, %d replayed, %d for unknown session, "+
		"%d malformed, %d with a source not routed here, %d key-exchange refused; %d carrier errors, "+
		"%d ICMP reports about others ignored, %d tun errors",
		s.txPackets.Load(), s.txBytes.Load(), s.rxPackets.Load(), s.rxBytes.Load(), s.exchanges.Load(),
		s.dropNoSession.Load(), s.dropAuth.Load(), s.dropReplay.Load(), s.dropUnknown.Load(),
		s.dropMalformed.Load(), s.dropSource.Load(), s.dropExchange.Load()+s.dropExchangeQueueFull.Load(),
		s.carrierErrors.Load(), s.carrierForeign.Load(), s.tunErrors.Load())
}

// exchangeMsg is a key-exchange message on its way to the control loop, by value.
type exchangeMsg struct {
	buf  [exchangeMessageSize]byte
	n    int
	from netip.AddrPort
}

type eventKind int

const (
	eventConfirmed      eventKind = iota // the inbound loop confirmed an unconfirmed session
	eventPeerMoved                       // a fresh authenticated message came from a new address
	eventPingRequest                     // the peer asked for a keepalive
	eventGoodbye                         // the peer is shutting down
	eventUnknownSession                  // data for a session we do not hold, while we hold none
	eventCarrierNews                     // carrier errors or path hints to look at (carrierNews)
	eventProbe                           // the peer sent a path MTU probe (size: its size)
	eventProbeAck                        // the peer acknowledged our probe (size: the probe's size)
)

type tunnelEvent struct {
	kind    eventKind
	session *session
	from    netip.AddrPort
	old     netip.AddrPort // eventPeerMoved: where the peer was (invalid: nowhere known)
	index   uint32         // eventUnknownSession: the receiver index of the data message
	counter uint64         // eventUnknownSession: its counter
	size    int            // eventProbe, eventProbeAck: the probe's size (carrier payload bytes)
}

// linkCore is where the data loops and the control loop meet. Who writes and who reads
// each field (the control loop is link.go's; "all" is the three loops and the status
// readers):
//
//	field           written by                                  read by
//	cfg, log, conn  newLink, before the loops start (fixed; the  all
//	                settings a reload changes are the link's own)
//	keyed, ifname   newLink (fixed)                             all
//	keys            control loop (rotate, setNext, expire,      all (atomic loads, per batch)
//	                clear); inbound loop (confirm, under its mutex)
//	peer            control loop (setPeer, forget); inbound     all (atomic load, per batch)
//	                loop (a fresh authentic message from a new
//	                address under the current session: roaming)
//	peerTunnelAddr  control loop (linkUp)                       outbound loop (tooBig)
//	up, wasUp       control loop (linkUp, linkDown)             all
//	lastSent        outbound loop; control loop (keepalives)    control loop (ping)
//	lastReceived    inbound loop; control loop (new session)    control loop (toping)
//	lastInbound     inbound loop                                outbound loop (answer watch)
//	carrierErrors   any loop (noteCarrierError), ever growing   control loop (maxerr)
//	stats           every loop (atomic adds, once per batch)    status, the exit summary
//	exchanges       inbound loop (queueExchange, never waits)   control loop
//	events          data loops (event, never waits)             control loop
//	carrierNews,    set by the loop that raises the event (one  cleared by the control loop
//	unknownPending  waiting at a time)
//	pathHint,       any loop (noteCarrierError)                 control loop (path MTU search)
//	localMTU
//	pathMax         control loop (path MTU search)              outbound loop (per batch)
//	pendingIndex    control loop (initiate)                     any loop (judging ICMP reports)
//	sources         control loop's route watcher                inbound loop (per batch)
//	limits          all (each rate limit is safe for concurrent use)
//	lifetime        control loop (at start, and a reload)       all (atomic load, per batch)
//	failed          outbound loop (the interface vanished)      main
//	stop            link.close                                  all
//
// Liveness timestamps are monotonic nanoseconds since epoch (since).
type linkCore struct {
	cfg    *config
	log    *logger
	conn   carrier
	ifname string
	keyed  bool // false with nokey: no sessions, datagrams are the inner packets

	keys           keyring
	peer           atomic.Pointer[netip.AddrPort] // nil until known
	peerTunnelAddr atomic.Pointer[netip.Addr]     // ptpaddr, configured or learned; nil until known
	up             atomic.Bool                    // the link state, for readers outside the control loop
	wasUp          atomic.Bool                    // the link has been up at least once

	epoch          time.Time
	lastSent       atomic.Int64               // the last datagram sent to the peer
	lastReceived   atomic.Int64               // the last authentic datagram from the peer
	lastInbound    atomic.Int64               // the last batch that had packets for the interface (any link)
	carrierErrors  atomic.Int64               // carrier errors that concern the peer, ever (maxerr counts the new ones)
	carrierNews    atomic.Bool                // an eventCarrierNews is on its way to the control loop
	unknownPending atomic.Bool                // an eventUnknownSession is on its way to the control loop
	pathHint       atomic.Int32               // the smallest "too big" size the network reported lately; 0: none
	localMTU       atomic.Int32               // this host's own "too big" size (the interface's MTU); 0: none
	pathMax        atomic.Int32               // the largest message (UDP payload) the path takes, as probed; 0: no limit
	lifetime       atomic.Int64               // how long a session may be used (PROTOCOL.md §5), in nanoseconds
	sources        atomic.Pointer[routeTable] // the inner sources the peer may use (rpfilter); nil: any
	pendingIndex   atomic.Uint32              // our pending initiation's index (0: none), for judging reports

	exchanges chan exchangeMsg
	events    chan tunnelEvent
	stats     stats
	limits    struct{ auth, exchange, malformed, plaintext, carrier, foreign, congestion, tun, icmp, pmtu, source, version1 rateLimit }

	failed chan error    // receives why the link cannot go on (the interface vanished)
	stop   chan struct{} // closed when the link stops
}

func newLinkCore(cfg *config, log *logger, conn carrier, ifname string) *linkCore {
	c := &linkCore{cfg: cfg, log: log, conn: conn, ifname: ifname, keyed: cfg.key != nil, epoch: time.Now(),
		exchanges: make(chan exchangeMsg, exchangeQueueSize), events: make(chan tunnelEvent, eventQueueSize),
		failed: make(chan error, 1), stop: make(chan struct{})}
	for _, r := range []*rateLimit{&c.limits.auth, &c.limits.exchange, &c.limits.malformed, &c.limits.plaintext,
		&c.limits.carrier, &c.limits.foreign, &c.limits.congestion, &c.limits.tun, &c.limits.pmtu, &c.limits.source} {
		r.interval = logInterval
	}
	c.limits.icmp.interval = time.Second / icmpPerSecond
	c.limits.version1.interval = version1LogInterval
	if !cfg.dynamicPeer() {
		p := cfg.peer
		c.peer.Store(&p)
	}
	if cfg.ptpaddr.IsValid() {
		p := cfg.ptpaddr
		c.peerTunnelAddr.Store(&p)
	}
	c.lastInbound.Store(-int64(answerQuiet)) // quiet from the start
	c.lifetime.Store(int64(sessionLifetime(cfg.tokey, cfg.tokxc)))
	return c
}

// usable reports whether s may still send or receive at now (PROTOCOL.md §5).
func (c *linkCore) usable(s *session, now time.Time) bool {
	return s.usable(now, time.Duration(c.lifetime.Load()))
}

// since returns the monotonic time of now relative to the link's epoch, as stored in
// the liveness timestamps.
func (c *linkCore) since(now time.Time) int64 { return int64(now.Sub(c.epoch)) }

// stopping reports whether the link is stopping.
func (c *linkCore) stopping() bool {
	select {
	case <-c.stop:
		return true
	default:
		return false
	}
}

// noteCarrierError counts what went wrong on the carrier and tells the control loop what
// concerns the link. Failed sends are this host's own word; the network's reports (ICMP
// errors, read from the socket's error queue) are nobody's word: one counts against the
// link only if it names a datagram we sent to the peer (its destination, and the ciped
// header it quotes where it quotes one), and even then it only makes the control loop
// ask the peer, authenticated, whether it is there (maxerr). "Too big" reports are hints
// to the path MTU search, nothing more. "No buffer space" is congestion on this host.
func (c *linkCore) noteCarrierError(err error) {
	forEachError(err, c.noteOneError)
}

func (c *linkCore) noteOneError(err error) {
	var ue *unreachableError
	var gf *gsoFallbackError
	switch {
	case errors.As(err, &ue):
		c.noteReports(ue)
		return
	case errors.As(err, &gf):
		return // logged where it happened; the datagrams went out one by one
	}
	to := "the peer"
	if p := c.peer.Load(); p != nil {
		to = p.String()
	}
	c.stats.carrierErrors.Add(1)
	switch {
	case errors.Is(err, syscall.ENOBUFS):
		c.log.limitedf(&c.limits.congestion, "carrier: sending to %s: %v (congestion on this host; dropped)", to, err)
		return
	}
	c.carrierErrors.Add(1)
	c.wakeControl()
	c.log.limitedf(&c.limits.carrier, "carrier: sending to %s failed: %v", to, err)
}

// noteReports judges the error-queue entries of one drain (see noteCarrierError).
func (c *linkCore) noteReports(ue *unreachableError) {
	peer := c.peer.Load()
	var mine, foreign uint64
	for i := range ue.reports {
		r := &ue.reports[i]
		switch {
		case peer == nil:
			foreign++
			continue
		case r.kind == reportLocalTooBig:
			// Our own kernel, about our own interface: it names no port (the socket is
			// not connected) and quotes nothing.
			if r.dst.Addr() != peer.Addr() {
				foreign++
				continue
			}
		case r.dst != *peer || !c.quotesOurs(r):
			foreign++
			continue
		}
		switch r.kind {
		case reportUnreachable:
			mine++
		case reportTooBig, reportLocalTooBig:
			c.notePathHint(r.mtu, r.kind == reportLocalTooBig)
		}
	}
	foreign += uint64(ue.count - len(ue.reports)) // not kept, so not judged: not held against the link
	if c.up.Load() {
		c.stats.carrierErrors.Add(mine)
	}
	c.stats.carrierForeign.Add(foreign)
	if foreign > 0 {
		c.log.limitedf(&c.limits.foreign, "carrier: ignored %d ICMP reports about datagrams we did not send to the peer", foreign)
	}
	if mine == 0 {
		return
	}
	if !c.up.Load() {
		// Initiations towards a peer that is not running yet: expected while the link is
		// down, and key exchanges are retried on their own schedule.
		c.log.Debugf("carrier: %d datagrams to %s reported undeliverable (%v): the peer is not there (yet)", mine, *peer, ue.err)
		return
	}
	c.carrierErrors.Add(int64(mine))
	c.wakeControl()
	times := "once"
	if mine > 1 {
		times = fmt.Sprintf("%d times", mine)
	}
	c.log.limitedf(&c.limits.carrier, "carrier: sending to %s failed %s (%v)", *peer, times, ue.err)
}

// quotesOurs reports whether what a report quotes of the datagram could be a message we
// sent: with a ciped header, one for a session we hold (the receiver index the peer
// chose) or for our pending initiation. Too short a quote says nothing either way.
func (c *linkCore) quotesOurs(r *carrierReport) bool {
	q := r.quote[:min(r.quoted, len(r.quote))]
	if !c.keyed || len(q) < 2 {
		return true
	}
	if q[offsetVersion] != protocolVersion {
		return false
	}
	if len(q) < 8 {
		return q[offsetType] >= messageInitiation && q[offsetType] <= messageUnknownSession
	}
	index := binary.BigEndian.Uint32(q[4:8])
	switch q[offsetType] {
	case messageInitiation:
		return index != 0 && index == c.pendingIndex.Load()
	case messageResponse:
		return c.keys.holdsIndex(index) // the responder's own index
	case messageData:
		for _, s := range []*session{c.keys.current.Load(), c.keys.previous.Load(), c.keys.next.Load()} {
			if s != nil && s.remoteIndex == index {
				return true
			}
		}
	case messageUnknownSession:
		return true // the index is the peer's, not ours to check
	}
	return false
}

// notePathHint passes a size the network (or, local, this host) says the path takes to
// the control loop's path MTU search, which decides. Only the smallest since the last
// look is kept.
func (c *linkCore) notePathHint(mtu int, local bool) {
	mtu = max(mtu, 68) // an old router's 0 means "smaller", not "none"
	if local {
		c.localMTU.Store(int32(mtu))
	} else {
		for {
			old := c.pathHint.Load()
			if old != 0 && int(old) <= mtu || c.pathHint.CompareAndSwap(old, int32(mtu)) {
				break
			}
		}
	}
	c.wakeControl()
}

// wakeControl tells the control loop that the carrier has news (errors, hints) for it,
// with at most one event waiting at a time.
func (c *linkCore) wakeControl() {
	if c.carrierNews.CompareAndSwap(false, true) {
		c.event(tunnelEvent{kind: eventCarrierNews})
	}
}

// event hands an event to the control loop without blocking. If the queue is full the
// event is dropped (and counted): the queue holds 64, and only authenticated messages
// (or one unknown-session event at a time) raise events, so that takes a peer flooding
// its own link.
func (c *linkCore) event(ev tunnelEvent) {
	select {
	case c.events <- ev:
	default:
		c.stats.droppedEvents.Add(1)
	}
}

// packetPath is the packet path of one link: the two data loops and their state. The link
// (link.go) makes it with newPacketPath, starts it with start and, once the device and the
// socket are closed, waits for it with wait.
type packetPath struct {
	*linkCore
	tun  tun.Device // the device, for the loops' errors; the link closes it
	port tunPort    // reads and writes it
	// The outbound state, held by the outbound loop while it reads and sends a batch, and
	// by the inbound loop while it sends what a write to the interface called forth.
	out *outbound
	// The inbound state: held by the inbound loop from the moment a read finds something
	// until the batch is written, and by the outbound loop while it watches for an answer.
	inMu  sync.Mutex
	watch *answerWatcher // nil: the carrier cannot be watched

	// parallelCrypto lets each data loop seal or open large batches on two cores. It is
	// set from the number of cores; tests may change it before start.
	parallelCrypto bool

	icmpBuf [icmpTooBigMax]byte // the outbound loop's ICMP messages are built here
	wg      sync.WaitGroup
}

// newPacketPath builds the packet path over an open TUN device (read and written through
// port) and the core's carrier.
func newPacketPath(c *linkCore, dev tun.Device, port tunPort) *packetPath {
	t := &packetPath{linkCore: c, tun: dev, port: port, parallelCrypto: runtime.GOMAXPROCS(0) >= parallelMinCores}
	if port != nil {
		t.out = &outbound{t: t, frames: port.newFrameBatch(), batch: outBatch{arena: make([]byte, outArenaSize)}}
	}
	return t
}

// start runs the two data loops.
func (t *packetPath) start() {
	if t.parallelCrypto {
		t.out.helper = newCryptoHelper(t.out.sealJobs)
		t.out.jobs = make([]sealJob, 0, outArenaSize/(dataOverhead+40))
	}
	// The watch needs to read the interface while it waits (else it would hold back what
	// is sent meanwhile), and a carrier it can read without waiting.
	if rn, ok := t.conn.(nowReceiver); ok && t.out != nil && t.port.readsNow() {
		t.watch = newAnswerWatcher(t, rn)
	}
	t.wg.Add(2)
	go func() { defer t.wg.Done(); t.routineReadFromTUN() }()
	go func() { defer t.wg.Done(); t.routineReadFromCarrier() }()
}

// wait returns when both data loops have ended: after stop is closed and the device and
// the socket are closed.
func (t *packetPath) wait() { t.wg.Wait() }

// ---------------------------------------------------------------------------------------
// Outbound: TUN → segment → seal → carrier.

// outBatch assembles the carrier messages of one sendmmsg: datagrams back to back in an
// arena, consecutive ones of one size (and TTL and TOS) grouped into GSO messages.
type outBatch struct {
	arena []byte
	used  int
	msgs  []carrierMsg
	start int  // arena offset of the last message
	open  bool // whether the last message may take more datagrams
}

func (o *outBatch) reset() {
	o.used, o.msgs, o.open = 0, o.msgs[:0], false
}

// add reserves the next n bytes of the arena for one datagram and returns them, with the
// capacity of the whole rest of the arena (for sealing by appending). A datagram to be
// fragmented (frag) is a message of its own.
func (o *outBatch) add(n int, ttl, tos uint8, frag bool) []byte {
	d := o.arena[o.used : o.used+n]
	if frag {
		o.msgs = append(o.msgs, carrierMsg{buf: d, ttl: ttl, tos: tos, frag: true})
		o.open = false
		o.used += n
		return d
	}
	if k := len(o.msgs) - 1; k >= 0 && o.open {
		m := &o.msgs[k]
		if m.ttl == ttl && m.tos == tos && n <= m.segSize && len(m.buf)/m.segSize < maxGSOSegments &&
			len(m.buf)+n <= maxGSOBytes {
			m.buf = o.arena[o.start : o.used+n]
			o.open = n == m.segSize // a shorter datagram ends the message
			o.used += n
			return d
		}
	}
	o.start = o.used
	o.msgs = append(o.msgs, carrierMsg{buf: o.arena[o.used : o.used+n], segSize: n, ttl: ttl, tos: tos})
	o.open = true
	o.used += n
	return d
}

// outbound is the state of the outbound loop; as the segmenter's sink it seals each
// inner packet into the batch.
type outbound struct {
	mu     sync.Mutex  // guards all that follows (see packetPath.out)
	frames *frameBatch // what the last read gave

	t       *packetPath
	seg     segmenter
	batch   outBatch
	peer    netip.AddrPort
	maxSize int      // the largest datagram the carrier path takes now; 0: no limit known
	session *session // nil with nokey
	counter uint64   // the next counter to use
	nonces  [2][12]byte
	packets uint64
	bytes   uint64

	// With a helper, a large batch is copied into the arena first and sealed there by two
	// cores (jobs); otherwise each packet is sealed as it is emitted.
	helper   *cryptoHelper
	parallel bool // this batch is sealed in two halves
	jobs     []sealJob
}

// sealJob is an inner packet copied into the arena, waiting to be sealed in place.
type sealJob struct {
	buf     []byte // header room, the packet, tag room
	n       int
	flags   byte
	counter uint64
}

// sealJobs seals jobs[from:to]; half (0 or 1) picks the nonce buffer. It is the helper's
// work function.
func (o *outbound) sealJobs(half, from, to int) {
	for i := from; i < to; i++ {
		j := &o.jobs[i]
		o.session.seal(j.buf, j.n, j.flags, j.counter, &o.nonces[half])
	}
}

// sealPending seals the jobs waiting in the arena, in two halves if there are enough.
func (o *outbound) sealPending() {
	if len(o.jobs) >= parallelMinPackets {
		o.helper.split(len(o.jobs))
	} else {
		o.sealJobs(0, 0, len(o.jobs))
	}
	o.jobs = o.jobs[:0]
}

// emit seals one inner packet into the batch: the header and the ciphertext go to the
// arena, the plaintext is read where it lies (or, for a batch sealed by two cores, it is
// copied there to be sealed in place). It implements packetSink.
func (o *outbound) emit(pkt []byte, flags byte) {
	ttl, tos := innerTTLAndTOS(pkt)
	if o.t.cfg.cttl != 0 {
		ttl = 0 // the socket's TTL is cttl
	}
	size := len(pkt)
	if o.session != nil {
		size += dataOverhead
	}
	frag := false
	if o.maxSize > 0 && size > o.maxSize {
		// The carrier path does not take it whole. A sender that asked not to fragment is
		// told how much fits, as a router would; but an IPv6 sender never below 1280,
		// which every IPv6 link must carry: such packets, and IPv4 ones without DF, go
		// in a fragmented carrier packet.
		fit := o.maxSize - (size - len(pkt))
		switch {
		case mayFragment(pkt):
			frag = true
		case pkt[0]>>4 == 6 && fit < minMTUIPv6 && len(pkt) <= minMTUIPv6:
			frag = true
		default:
			if pkt[0]>>4 == 6 {
				fit = max(fit, minMTUIPv6)
			}
			o.t.tooBig(pkt, fit)
			return
		}
	}
	o.packets++
	o.bytes += uint64(len(pkt))
	if len(o.batch.arena)-o.batch.used < size {
		o.t.flush(o) // the arena is full: send it, then go on
	}
	if o.session == nil {
		if flags&flagCsumPartial != 0 && !completeChecksum(pkt) {
			return
		}
		copy(o.batch.add(len(pkt), ttl, tos, frag), pkt)
		return
	}
	d := o.batch.add(size, ttl, tos, frag)
	if o.parallel {
		copy(d[dataHeaderSize:], pkt)
		o.jobs = append(o.jobs, sealJob{buf: d, n: len(pkt), flags: flags, counter: o.counter})
	} else {
		o.session.sealTo(d, pkt, flags, o.counter, &o.nonces[0])
	}
	o.counter++
}

// framePackets is the number of inner packets a frame makes.
func framePackets(f *tunFrame) int {
	if f.hdr.gsoType != virtioGSONone && f.hdr.gsoSize > 0 {
		return max(1, (len(f.pkt)+int(f.hdr.gsoSize)-1)/int(f.hdr.gsoSize))
	}
	return 1
}

func (t *packetPath) routineReadFromTUN() {
	out := t.out
	if out.helper != nil {
		defer out.helper.stop()
	}
	for {
		err := t.port.read(out.frames, &out.mu)
		if err == nil {
			t.sendFrames(out.frames.frames, out)
			if t.watch != nil && out.packets > 0 && out.packets <= answerWatchPackets {
				t.watchForAnswer(out)
			}
		}
		out.mu.Unlock()
		if err != nil {
			if t.stopping() {
				return
			}
			if errors.Is(err, os.ErrClosed) {
				t.failed <- fmt.Errorf("the interface %s is gone", t.ifname)
				return
			}
			t.stats.tunErrors.Add(1)
			t.log.limitedf(&t.limits.tun, "reading from the interface: %v", err)
			time.Sleep(errorPause)
		}
	}
}

// sendNow sends what the interface has ready now; the caller holds the outbound lock.
func (t *packetPath) sendNow(out *outbound) {
	if err := t.port.readNow(out.frames); err == nil && len(out.frames.frames) > 0 {
		t.sendFrames(out.frames.frames, out)
	}
}

// sendFrames cuts, seals and sends the frames of one read.
func (t *packetPath) sendFrames(frames []tunFrame, out *outbound) {
	peer := t.peer.Load()
	now := time.Now()
	out.session, out.packets, out.bytes = nil, 0, 0
	if t.keyed {
		out.session = t.keys.current.Load()
		if !t.usable(out.session, now) {
			out.session = nil
		}
	}
	if peer == nil || (t.keyed && out.session == nil) {
		// Before the link was ever up (the kernel's own first packets on a new
		// interface), this is expected, not worth a count.
		if t.wasUp.Load() {
			for i := range frames {
				t.stats.dropNoSession.Add(uint64(framePackets(&frames[i])))
			}
		}
		return
	}
	out.peer = *peer
	out.maxSize = int(t.pathMax.Load())
	out.batch.reset()
	if out.helper != nil && out.session != nil {
		total := 0
		for i := range frames {
			total += framePackets(&frames[i])
		}
		out.parallel = total >= parallelMinPackets
	}
	for i := range frames {
		f := &frames[i]
		n := framePackets(f)
		if out.session != nil {
			first, ok := out.session.reserveCounters(n)
			if !ok {
				t.stats.dropNoSession.Add(uint64(n))
				continue
			}
			out.counter = first
		}
		if err := out.seg.split(&f.hdr, f.pkt, out); err != nil {
			t.stats.tunErrors.Add(1)
			t.log.limitedf(&t.limits.tun, "dropped a frame from the interface: %v", err)
		}
	}
	t.flush(out)
	t.lastSent.Store(t.since(now))
	t.stats.txPackets.Add(out.packets)
	t.stats.txBytes.Add(out.bytes)
}

// flush seals what waits to be sealed, sends what the batch holds and empties it.
func (t *packetPath) flush(out *outbound) {
	if len(out.jobs) > 0 {
		out.sealPending()
	}
	if len(out.batch.msgs) == 0 {
		return
	}
	if err := t.conn.WriteBatch(out.batch.msgs, out.peer); err != nil {
		var gf *gsoFallbackError
		if errors.As(err, &gf) {
			t.log.Printf("%v", gf)
		}
		t.noteCarrierError(err)
	}
	out.batch.reset()
}

// mayFragment reports whether an inner packet may travel in a fragmented carrier packet
// whatever its size: an IPv4 packet without DF. (IPv6 forbids fragmentation on the way,
// as DF does.)
func mayFragment(p []byte) bool {
	return len(p) >= 20 && p[0]>>4 == 4 && p[6]&0x40 == 0
}

// tooBig answers an inner packet that does not fit the carrier path with ICMP
// "fragmentation needed" (IPv4) or "packet too big" (IPv6) naming mtu, written into the
// interface towards the packet's sender; at most icmpPerSecond of them a second. Only
// the outbound loop calls it.
func (t *packetPath) tooBig(pkt []byte, mtu int) {
	t.stats.dropTooBig.Add(1)
	if ok, _ := t.limits.icmp.allow(time.Now()); !ok {
		return
	}
	var from netip.Addr // the tunnel's far end, as a router on the way would be
	if p := t.peerTunnelAddr.Load(); p != nil {
		from = *p
	}
	msg := icmpTooBig(t.icmpBuf[:0], pkt, mtu, from)
	if msg == nil {
		return
	}
	if err := t.port.inject(msg); err != nil {
		t.log.limitedf(&t.limits.tun, "writing ICMP to the interface: %v", err)
	}
	t.log.limitedf(&t.limits.pmtu, "the carrier path to the peer takes packets of %d bytes at most: told senders of larger ones (mtu %d)", mtu+dataOverhead, mtu)
}

// innerTTLAndTOS reads the TTL (hop limit) and the DSCP bits of an inner packet, which the
// carrier packet copies. The ECN bits are not copied: a congestion mark set on the carrier
// would not be carried back into the inner packet (RFC 6040's compatibility mode).
func innerTTLAndTOS(p []byte) (ttl, tos uint8) {
	switch {
	case len(p) >= 20 && p[0]>>4 == 4:
		return p[8], p[1] &^ 0x03
	case len(p) >= 40 && p[0]>>4 == 6:
		return p[7], (p[0]<<4 | p[1]>>4) &^ 0x03
	}
	return 0, 0
}

// ---------------------------------------------------------------------------------------
// Inbound: carrier → open → replay check → TUN.

func (t *packetPath) routineReadFromCarrier() {
	size := t.conn.receiveBufferSize(dataOverhead + t.cfg.mtu)
	batch := carrierBatch
	if size > dataOverhead+t.cfg.mtu {
		batch = groBatch // each message may hold up to 64 datagrams
	}
	msgs := make([]carrierMsg, batch)
	for i := range msgs {
		msgs[i].buf = make([]byte, size)
	}
	pkts := make([]innerPacket, 0, batch*maxGSOSegments)
	in := &inbound{t: t, jobs: make([]openJob, 0, batch*maxGSOSegments)}
	if t.parallelCrypto {
		in.helper = newCryptoHelper(in.openJobs)
		defer in.helper.stop()
	}
	locked := false // whether ReadBatch returns holding t.inMu
	if rn, ok := t.conn.(nowReceiver); ok && t.watch != nil {
		rn.setReceiveLock(&t.inMu)
		locked = true
	}
	for {
		n, err := t.conn.ReadBatch(msgs)
		if !locked {
			t.inMu.Lock()
		}
		if err == nil {
			pkts = in.receive(msgs[:n], pkts[:0])
			if len(pkts) > 0 {
				err = t.deliver(pkts, false)
			}
		}
		t.inMu.Unlock()
		if err != nil {
			if errors.Is(err, net.ErrClosed) || t.stopping() {
				return
			}
			if !t.receiveError(err) {
				time.Sleep(errorPause)
			}
		}
	}
}

// receiveError counts an error of a carrier read; it reports whether it was an expected
// one (the network's report of datagrams that did not arrive).
func (t *packetPath) receiveError(err error) (expected bool) {
	var ue *unreachableError
	if errors.As(err, &ue) {
		t.noteCarrierError(err)
		return true
	}
	t.stats.carrierErrors.Add(1)
	t.log.limitedf(&t.limits.carrier, "receiving: %v", err)
	return false
}

// deliver writes a batch of inner packets to the interface, and sends at once what the
// kernel answered within the write (an echo reply, TCP ACKs): that spares a wake-up of
// the outbound loop. holdingOut says whether the caller holds the outbound lock. A write
// error is handled here; it returns nil unless the link is stopping.
func (t *packetPath) deliver(pkts []innerPacket, holdingOut bool) error {
	err := t.port.write(pkts)
	if holdingOut {
		t.sendNow(t.out)
	} else if t.out.mu.TryLock() { // if the outbound loop is busy, it is left to it
		t.sendNow(t.out)
		t.out.mu.Unlock()
	}
	if err != nil {
		var cf *errCoalesceFallback
		if errors.As(err, &cf) {
			t.log.Printf("%v", cf)
		}
		if t.stopping() {
			return err
		}
		t.stats.tunErrors.Add(1)
		t.log.limitedf(&t.limits.tun, "writing to the interface: %v", err)
	}
	return nil
}

// nowReceiver is a carrier that can be read without waiting by the holder of its
// receive lock (udpCarrier).
type nowReceiver interface {
	setReceiveLock(lock *sync.Mutex)
	readNow(msgs []carrierMsg) (int, error)
}

// answerWatcher is the outbound loop's means to receive an answer itself (see
// answerWatch). Its buffers are used under t.inMu, the rest under the outbound lock.
type answerWatcher struct {
	conn       nowReceiver
	msgs       []carrierMsg
	pkts       []innerPacket
	in         *inbound
	pause      time.Duration // the pause after the next watch that sees nothing
	pauseUntil time.Time
}

func newAnswerWatcher(t *packetPath, conn nowReceiver) *answerWatcher {
	size := t.conn.receiveBufferSize(dataOverhead + t.cfg.mtu)
	w := &answerWatcher{conn: conn, msgs: make([]carrierMsg, receiveNowBatch),
		pkts:  make([]innerPacket, 0, receiveNowBatch*maxGSOSegments),
		in:    &inbound{t: t, jobs: make([]openJob, 0, receiveNowBatch*maxGSOSegments)},
		pause: answerPauseMin}
	for i := range w.msgs {
		w.msgs[i].buf = make([]byte, size)
	}
	return w
}

// watchForAnswer is called by the outbound loop, holding the outbound lock, after it
// sent a small batch. If nothing came in for answerQuiet (a busy link needs no watch:
// its inbound loop is awake), then until answerWatch has passed it polls the carrier, and
// handles what comes as the inbound loop would; meanwhile it sends what the interface
// has ready. It returns when something came, when the inbound loop holds the inbound
// state (what comes is then the inbound loop's), or when the time is up.
func (t *packetPath) watchForAnswer(out *outbound) {
	w := t.watch
	now := time.Now()
	if now.Before(w.pauseUntil) || time.Duration(t.since(now)-t.lastInbound.Load()) < answerQuiet {
		return
	}
	deadline := now.Add(answerWatch)
	for {
		if !t.inMu.TryLock() {
			return
		}
		n, err := w.conn.readNow(w.msgs)
		if n > 0 && err == nil {
			w.pkts = w.in.receive(w.msgs[:n], w.pkts[:0])
			if len(w.pkts) > 0 {
				_ = t.deliver(w.pkts, true)
			}
		}
		t.inMu.Unlock()
		if err != nil {
			if !errors.Is(err, net.ErrClosed) && !t.stopping() {
				t.receiveError(err)
			}
			return
		}
		if n > 0 {
			w.pause = answerPauseMin
			return
		}
		if t.port.readNow(out.frames) == nil && len(out.frames.frames) > 0 {
			t.sendFrames(out.frames.frames, out)
		}
		if now = time.Now(); now.After(deadline) {
			w.pauseUntil = now.Add(w.pause)
			w.pause = min(2*w.pause, answerPauseMax)
			return
		}
	}
}

// inbound is the state of the inbound loop for one batch.
type inbound struct {
	t      *packetPath
	nonces [2][12]byte
	held   [3]*session // current, previous, unconfirmed: the sessions a message may name
	peer   *netip.AddrPort
	now    time.Time

	// Data messages of the batch, opened by two cores when there are many (helper).
	jobs   []openJob
	helper *cryptoHelper

	packets, bytes, auth, replays, unknown, malformed, badSource uint64
	authentic                                                    bool

	// The source filter of the batch (nil: none), and its last answer: a batch is mostly
	// one flow, so mostly one lookup.
	filter     *routeTable
	lastFilter *routeTable
	lastSrc    netip.Addr
	lastOK     bool
}

// openJob is a data message of a batch on its way through PROTOCOL.md §4.1.
type openJob struct {
	msg   []byte
	from  netip.AddrPort
	h     dataHeader
	s     *session
	inner []byte // the opened inner packet; nil if it failed
}

// openJobs opens jobs[from:to] in place; half (0 or 1) picks the nonce buffer. It is the
// helper's work function.
func (in *inbound) openJobs(half, from, to int) {
	for i := from; i < to; i++ {
		j := &in.jobs[i]
		inner, err := j.s.open(j.msg, j.h, &in.nonces[half])
		if err != nil {
			inner = nil
		} else if inner == nil {
			inner = j.msg[dataHeaderSize:dataHeaderSize] // a keepalive: empty, not nil
		}
		j.inner = inner
	}
}

// receive handles one batch of carrier messages and appends the inner packets to write
// to the interface to pkts: it sorts the datagrams (§4.1 steps 1 and 2), opens the data
// messages (step 3; in two halves on two cores if there are many), and then, in order,
// applies the replay window and the rest (step 4).
func (in *inbound) receive(msgs []carrierMsg, pkts []innerPacket) []innerPacket {
	t := in.t
	in.now = time.Now()
	in.held = [3]*session{t.keys.current.Load(), t.keys.previous.Load(), t.keys.next.Load()}
	for i, s := range in.held {
		if !t.usable(s, in.now) {
			in.held[i] = nil
		}
	}
	in.peer = t.peer.Load()
	in.filter = t.sources.Load()
	in.packets, in.bytes, in.auth, in.replays, in.unknown, in.malformed, in.badSource, in.authentic = 0, 0, 0, 0, 0, 0, 0, false
	in.jobs = in.jobs[:0]
	for i := range msgs {
		m := &msgs[i]
		b := m.buf[:m.n]
		step := len(b)
		if m.segSize > 0 {
			step = m.segSize
		}
		for len(b) > 0 {
			d := b[:min(step, len(b))]
			b = b[len(d):]
			if !t.keyed {
				pkts = in.plain(d, m.from, pkts)
			} else {
				in.sort(d, m.from)
			}
		}
	}
	if in.helper != nil && len(in.jobs) >= parallelMinPackets {
		in.helper.split(len(in.jobs))
	} else {
		in.openJobs(0, 0, len(in.jobs))
	}
	for i := range in.jobs {
		pkts = in.finish(&in.jobs[i], pkts)
	}
	if in.authentic {
		t.lastReceived.Store(t.since(in.now))
	}
	if in.packets > 0 {
		t.lastInbound.Store(t.since(in.now))
	}
	t.stats.rxPackets.Add(in.packets)
	t.stats.rxBytes.Add(in.bytes)
	t.stats.dropAuth.Add(in.auth)
	t.stats.dropReplay.Add(in.replays)
	t.stats.dropUnknown.Add(in.unknown)
	t.stats.dropMalformed.Add(in.malformed)
	t.stats.dropSource.Add(in.badSource)
	if in.auth > 0 {
		t.log.limitedf(&t.limits.auth, "dropped %d data messages that failed authentication", in.auth)
	}
	if in.badSource > 0 {
		t.log.limitedf(&t.limits.source, "dropped %d packets from the peer whose source this host does not route "+
			"back through the tunnel (rpfilter; last from %s)", in.badSource, in.lastSrc)
	}
	return pkts
}

// sort handles the first steps of a datagram of a keyed link (PROTOCOL.md §4.1 steps 1
// and 2): key-exchange messages go to the control loop, data messages for a session we
// hold become jobs.
func (in *inbound) sort(msg []byte, from netip.AddrPort) {
	t := in.t
	if len(msg) == v1InitiationSize && msg[offsetVersion] == protocolVersion1 && msg[offsetType] == messageInitiation {
		t.queueExchange(msg, from) // the control loop tells whether the peer speaks version 1 (PROTOCOL.md §10)
		return
	}
	if len(msg) < 2 || msg[offsetVersion] != protocolVersion {
		in.malformed++
		t.logMalformed(msg, from)
		return
	}
	switch msg[offsetType] {
	case messageInitiation, messageResponse, messageUnknownSession:
		t.queueExchange(msg, from)
		return
	case messageData:
	default:
		in.malformed++
		return
	}
	h, err := parseDataHeader(msg)
	if err != nil {
		in.malformed++
		return
	}
	for _, s := range in.held {
		if s != nil && s.localIndex == h.receiver {
			in.jobs = append(in.jobs, openJob{msg: msg, from: from, h: h, s: s})
			return
		}
	}
	if in.held == [3]*session{} && t.unknownPending.CompareAndSwap(false, true) {
		// We hold no session at all, yet the sender has one with us: we lost ours (a
		// restart). The control loop may tell it so (PROTOCOL.md §4.5). One such event
		// at a time: anyone can send these datagrams, and the queue is for real news.
		t.event(tunnelEvent{kind: eventUnknownSession, from: from, index: h.receiver, counter: h.counter})
	}
	in.unknown++
}

// finish takes an opened data message through the replay window and what follows it
// (PROTOCOL.md §4.1 step 4, §4.2), in the order the messages arrived.
func (in *inbound) finish(j *openJob, pkts []innerPacket) []innerPacket {
	t := in.t
	if j.inner == nil {
		in.auth++
		return pkts
	}
	s, h, from, inner := j.s, j.h, j.from, j.inner
	first := !s.received.Load()
	newest := first || h.counter > s.recvMax
	if !s.acceptCounter(h.counter) {
		in.replays++
		return pkts
	}
	in.authentic = true
	if newest {
		s.recvMax = h.counter
	}
	if first {
		s.received.Store(true)
	}
	confirmed := s == in.held[2] && t.keys.confirm(s)
	if newest && (s == in.held[0] || confirmed) && (in.peer == nil || *in.peer != from) {
		// The peer moved (PROTOCOL.md §6.1): what we send from now on goes to where this
		// fresh, authentic message came from. (Rare: the one allocation here.)
		ev := tunnelEvent{kind: eventPeerMoved, session: s, from: from}
		if in.peer != nil {
			ev.old = *in.peer
		}
		p := from
		t.peer.Store(&p)
		in.peer = &p
		t.event(ev)
	}
	if confirmed {
		t.event(tunnelEvent{kind: eventConfirmed, session: s, from: from})
	}
	if h.flags&(flagProbe|flagProbeAck) != 0 {
		// Path MTU probing (PROTOCOL.md §4.6): padding or a size, never a packet.
		switch {
		case h.flags&flagProbe != 0:
			t.event(tunnelEvent{kind: eventProbe, session: s, size: len(j.msg)})
		case len(inner) == probeAckSize:
			t.event(tunnelEvent{kind: eventProbeAck, session: s, size: int(binary.BigEndian.Uint32(inner))})
		}
		return pkts
	}
	if len(inner) == 0 {
		switch {
		case h.flags&flagGoodbye != 0:
			t.event(tunnelEvent{kind: eventGoodbye, session: s, from: from})
		case h.flags&flagPing != 0:
			t.event(tunnelEvent{kind: eventPingRequest, session: s})
		}
		return pkts
	}
	partial := h.flags&flagCsumPartial != 0
	if !innerPacketOK(inner) {
		in.malformed++
		return pkts
	}
	if in.filter != nil && !in.sourceAllowed(inner) {
		in.badSource++
		return pkts
	}
	if partial {
		if _, _, _, ok := l4Info(inner); !ok {
			in.malformed++
			return pkts
		}
	}
	in.packets++
	in.bytes += uint64(len(inner))
	return append(pkts, innerPacket{pkt: inner, partial: partial})
}

// sourceAllowed reports whether this host would route a reply to the source of an inner
// packet (checked by innerPacketOK) back through the tunnel.
func (in *inbound) sourceAllowed(p []byte) bool {
	var src netip.Addr
	if p[0]>>4 == 4 {
		src = netip.AddrFrom4([4]byte(p[12:16]))
	} else {
		src = netip.AddrFrom16([16]byte(p[8:24]))
	}
	if src != in.lastSrc || in.filter != in.lastFilter {
		in.lastSrc, in.lastFilter, in.lastOK = src, in.filter, in.filter.allows(src)
	}
	return in.lastOK
}

// plain handles one datagram of a nokey link: it is the inner packet.
func (in *inbound) plain(d []byte, from netip.AddrPort, pkts []innerPacket) []innerPacket {
	if !innerPacketOK(d) {
		in.malformed++
		return pkts
	}
	if in.peer == nil {
		in.t.event(tunnelEvent{kind: eventPeerMoved, from: from})
		p := from
		in.peer = &p
	} else if *in.peer != from {
		in.malformed++ // nokey learns its peer once and never moves
		return pkts
	}
	if in.filter != nil && !in.sourceAllowed(d) {
		in.badSource++
		return pkts
	}
	in.packets++
	in.bytes += uint64(len(d))
	return append(pkts, innerPacket{pkt: d})
}

// innerPacketOK checks that an inner packet is an IPv4 or IPv6 packet of exactly its own
// length, before it is written to the interface.
func innerPacketOK(p []byte) bool {
	switch {
	case len(p) >= 20 && p[0]>>4 == 4:
		return int(binary.BigEndian.Uint16(p[2:])) == len(p)
	case len(p) >= 40 && p[0]>>4 == 6:
		return int(binary.BigEndian.Uint16(p[4:]))+40 == len(p)
	}
	return false
}

func (c *linkCore) logMalformed(msg []byte, from netip.AddrPort) {
	if len(msg) > 0 && (msg[0]>>4 == 4 || msg[0]>>4 == 6) {
		c.log.limitedf(&c.limits.plaintext, "dropped an unencrypted packet from %s (is the peer running with nokey?)", from)
		return
	}
	if c.log.debug.Load() {
		c.log.limitedf(&c.limits.malformed, "dropped a malformed datagram of %d bytes from %s", len(msg), from)
	}
}

// queueExchange copies a key-exchange message to the control loop.
func (c *linkCore) queueExchange(msg []byte, from netip.AddrPort) {
	if len(msg) > exchangeMessageSize {
		c.stats.dropMalformed.Add(1)
		return
	}
	m := exchangeMsg{n: len(msg), from: from}
	copy(m.buf[:], msg)
	select {
	case c.exchanges <- m:
	default:
		c.stats.dropExchangeQueueFull.Add(1)
	}
}
