package main

// The tunnel: one TUN device, one carrier socket, one peer.
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
// side's state has one lock (outbound.mu, tunnel.inMu), taken by its own loop for each
// read (and held through the batch) and only tried by the other. The one wait across
// loops: the inbound loop, woken by a datagram, waits while a watch handles it.
//
// Control, RoutineControl (one goroutine): key exchanges, timers, the link state and the
// scripts. It owns the keyExchange and the link state. Sessions are published through the
// keyring's atomic pointers; the inbound loop changes the keyring only to confirm a
// responder's new session, under the keyring's mutex, once per key exchange.
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
	"strconv"
	"strings"
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
	icmpPerSecond       = 20               // ICMP "too big" messages we send at most
	unreachableRetry    = time.Second      // retry of an initiation the carrier reported unreachable
	groBatch            = 8                // messages (of up to 64 datagrams) per recvmmsg with GRO
	outArenaSize        = 256 << 10        // bytes of sealed datagrams per sendmmsg
	exchangeQueueSize   = 64               // key-exchange messages waiting for the control loop
	eventQueueSize      = 64               // events from the data loops to the control loop
	logInterval         = 10 * time.Second // at most one line per kind of bad packet
	minTick, maxTick    = 10 * time.Millisecond, time.Second
	errorPause          = 10 * time.Millisecond // after an unexpected read error
	exchangeMessageSize = initiationSize        // the larger of the two

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
	receiveNowBatch    = 4 // messages per recvmmsg of a watch
)

// keyring holds the sessions of PROTOCOL.md §5. Readers load the pointers without a lock;
// changes are serialised by mu. The zero value is an empty keyring.
type keyring struct {
	mu       sync.Mutex
	current  atomic.Pointer[session]
	previous atomic.Pointer[session]
	next     atomic.Pointer[session] // a responder's session before the initiator used it
}

// rotate makes s current and the current one previous.
func (k *keyring) rotate(s *session) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.previous.Store(k.current.Load())
	k.current.Store(s)
	if k.next.Load() == s {
		k.next.Store(nil)
	}
}

func (k *keyring) setNext(s *session) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.next.Store(s)
}

// confirm rotates s in if it is still the unconfirmed session; it reports whether it was.
func (k *keyring) confirm(s *session) bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.next.Load() != s {
		return false
	}
	k.previous.Store(k.current.Load())
	k.current.Store(s)
	k.next.Store(nil)
	return true
}

// expire drops sessions older than maxAge and reports whether the current one went.
func (k *keyring) expire(now time.Time, maxAge time.Duration) (droppedCurrent bool) {
	k.mu.Lock()
	defer k.mu.Unlock()
	for _, p := range []*atomic.Pointer[session]{&k.current, &k.previous, &k.next} {
		if s := p.Load(); s != nil && now.Sub(s.created) >= maxAge {
			p.Store(nil)
			droppedCurrent = droppedCurrent || p == &k.current
		}
	}
	return droppedCurrent
}

func (k *keyring) clear() {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.current.Store(nil)
	k.previous.Store(nil)
	k.next.Store(nil)
}

// inUse reports whether a held session uses index as its local index.
func (k *keyring) inUse(index uint32) bool {
	for _, s := range []*session{k.current.Load(), k.previous.Load(), k.next.Load()} {
		if s != nil && s.localIndex == index {
			return true
		}
	}
	return false
}

// stats are the tunnel's counters. They are updated once per batch and safe to read at
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
	dropExchange          atomic.Uint64 // key-exchange messages refused
	dropExchangeQueueFull atomic.Uint64 // key-exchange messages dropped because the queue was full
	carrierErrors         atomic.Uint64 // failed carrier sends and receives
	tunErrors             atomic.Uint64 // failed TUN reads and writes
	exchanges             atomic.Uint64 // completed key exchanges
}

// summary is the one-line account of the counters logged at exit.
func (s *stats) summary() string {
	return fmt.Sprintf("sent %d packets (%d bytes), received %d packets (%d bytes), %d key exchanges; "+
		"dropped: %d without session, %d failed authentication, %d replayed, %d for unknown session, "+
		"%d malformed, %d key-exchange refused; %d carrier errors, %d tun errors",
		s.txPackets.Load(), s.txBytes.Load(), s.rxPackets.Load(), s.rxBytes.Load(), s.exchanges.Load(),
		s.dropNoSession.Load(), s.dropAuth.Load(), s.dropReplay.Load(), s.dropUnknown.Load(),
		s.dropMalformed.Load(), s.dropExchange.Load()+s.dropExchangeQueueFull.Load(),
		s.carrierErrors.Load(), s.tunErrors.Load())
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
)

type tunnelEvent struct {
	kind    eventKind
	session *session
	from    netip.AddrPort
}

// tunnel is one running link. Make one with newTunnel, start it with start, stop it
// with close.
type tunnel struct {
	cfg  *config
	log  *logger
	tun  tun.Device // owns the device: events, MTU, close
	port tunPort    // reads and writes it
	// The outbound state, held by the outbound loop while it reads and sends a batch, and
	// by the inbound loop while it sends what a write to the interface called forth.
	out *outbound
	// The inbound state: held by the inbound loop from the moment a read finds something
	// until the batch is written, and by the outbound loop while it watches for an answer.
	inMu    sync.Mutex
	watch   *answerWatcher // nil: the carrier cannot be watched
	conn    carrier
	ifname  string
	ifindex int // 0: do not configure the interface (in-process tests)

	keys keyring
	peer atomic.Pointer[netip.AddrPort] // nil until known
	up   atomic.Bool                    // the link state, for readers outside the control loop
	// peerTunnelAddr is ptpaddr, configured or learned; nil until known.
	peerTunnelAddr atomic.Pointer[netip.Addr]
	rekeyAfter     uint64 // packets sent under a session before a new exchange

	// parallelCrypto lets each data loop seal or open large batches on two cores. It is
	// set from the number of cores; tests may change it before start.
	parallelCrypto bool

	// Liveness, written by the data loops once per batch: monotonic nanoseconds since
	// epoch of the last datagram sent to the peer and the last authentic one received, and
	// carrier errors since the last completed key exchange (maxerr).
	epoch         time.Time
	lastSent      atomic.Int64
	lastReceived  atomic.Int64
	lastInbound   atomic.Int64 // the last batch that had packets for the interface (any link)
	carrierErrors atomic.Int64
	unreachable   atomic.Bool // the carrier reported an ICMP error since the last initiation
	// wallSkew is added to the wall clock the key exchange reads (its only use of the
	// wall clock: timers run on the monotonic clock); tests jump it.
	wallSkew atomic.Int64
	kx       *keyExchange // control loop only; nil with nokey

	exchanges chan exchangeMsg
	events    chan tunnelEvent
	stats     stats
	scripts   *scriptRunner

	// What readers outside the control loop may know of the link (status), and a hook
	// told of link changes (systemd's STATUS line).
	viewMu       sync.Mutex
	view         linkView
	onLinkChange func(status string)

	// Control loop state.
	link      linkState
	candidate netip.AddrPort // where the last valid initiation came from
	lastPing  time.Time      // when we last asked the peer for a keepalive
	lastAsked time.Time      // when we last asked the peer to confirm our new session
	ctlBuf    [dataOverhead]byte
	ctlNonce  [12]byte
	ctlMsg    [1]carrierMsg

	limits  struct{ auth, exchange, malformed, plaintext, carrier, congestion, tun, icmp, pmtu rateLimit }
	icmpBuf [icmpTooBigMax]byte // the outbound loop's ICMP messages are built here

	failed   chan error // receives why the tunnel cannot go on (the interface vanished)
	stop     chan struct{}
	stopOnce sync.Once
	ctlDone  chan struct{} // closed when the control loop has finished its shutdown work
	wg       sync.WaitGroup
}

// linkState is what the control loop knows of the link.
type linkState struct {
	up            bool
	since         time.Time
	args          [6]string       // the scripts' arguments while up
	env           []string        // and their environment
	configuredPtp netip.Addr      // peer address currently on the interface
	peerInfo      exchangePayload // what the peer told us in the last exchange
}

// newTunnel builds a tunnel over an open TUN device (read and written through port) and
// carrier. ifindex 0 skips interface configuration.
func newTunnel(cfg *config, log *logger, dev tun.Device, port tunPort, conn carrier, ifname string, ifindex int) *tunnel {
	t := &tunnel{cfg: cfg, log: log, tun: dev, port: port, conn: conn, ifname: ifname, ifindex: ifindex,
		exchanges: make(chan exchangeMsg, exchangeQueueSize), events: make(chan tunnelEvent, eventQueueSize),
		failed: make(chan error, 1),
		stop:   make(chan struct{}), ctlDone: make(chan struct{}), rekeyAfter: rekeyAfterPackets, epoch: time.Now(),
		parallelCrypto: runtime.GOMAXPROCS(0) >= parallelMinCores}
	for _, r := range []*rateLimit{&t.limits.auth, &t.limits.exchange, &t.limits.malformed, &t.limits.plaintext,
		&t.limits.carrier, &t.limits.congestion, &t.limits.tun, &t.limits.pmtu} {
		r.interval = logInterval
	}
	t.limits.icmp.interval = time.Second / icmpPerSecond
	if !cfg.dynamicPeer() {
		p := cfg.peer
		t.peer.Store(&p)
	}
	if port != nil {
		t.out = &outbound{t: t, frames: port.newFrameBatch(), batch: outBatch{arena: make([]byte, outArenaSize)}}
	}
	if cfg.key != nil {
		t.kx = &keyExchange{
			cfg: exchangeConfig{secrets: deriveLinkSecrets(*cfg.key), ciphers: cfg.ciphers, mtu: cfg.mtu,
				addr: cfg.ipaddr, expected: cfg.ptpaddr, tokxts: cfg.tokxts},
			wallClock: t.wallClock,
			inUse:     t.keys.inUse,
		}
	}
	t.lastInbound.Store(-int64(answerQuiet)) // quiet from the start
	t.link.configuredPtp = cfg.ptpaddr
	if cfg.ptpaddr.IsValid() {
		p := cfg.ptpaddr
		t.peerTunnelAddr.Store(&p)
		t.view.ptp = p.String()
	}
	t.scripts = newScriptRunner(log)
	return t
}

// start runs the tunnel's goroutines.
func (t *tunnel) start() {
	if t.parallelCrypto {
		t.out.helper = newCryptoHelper(t.out.sealJobs)
		t.out.jobs = make([]sealJob, 0, outArenaSize/(dataOverhead+40))
	}
	// The watch needs to read the interface while it waits (else it would hold back what
	// is sent meanwhile), and a carrier it can read without waiting.
	if rn, ok := t.conn.(nowReceiver); ok && t.out != nil && t.port.readsNow() {
		t.watch = newAnswerWatcher(t, rn)
	}
	t.wg.Add(4)
	go func() { defer t.wg.Done(); t.routineReadFromTUN() }()
	go func() { defer t.wg.Done(); t.routineReadFromCarrier() }()
	go func() { defer t.wg.Done(); t.routineControl() }()
	go func() {
		defer t.wg.Done()
		for ev := range t.tun.Events() {
			if ev&tun.EventMTUUpdate != 0 {
				if mtu, err := t.tun.MTU(); err == nil && mtu != t.cfg.mtu {
					t.log.Printf("warning: the interface MTU was changed to %d from outside; ciped sends and receives at most mtu=%d", mtu, t.cfg.mtu)
				}
			}
			if ev&tun.EventDown != 0 {
				t.log.Debugf("the interface is down")
			}
		}
	}()
}

// close takes the link down (ip-down, goodbye to the peer), waits for the scripts,
// closes the device and the socket and waits for every goroutine. It may be called more
// than once; every call returns when all is done.
func (t *tunnel) close() {
	t.stopOnce.Do(func() {
		close(t.stop)
		<-t.ctlDone
		t.scripts.close()
		t.tun.Close()
		t.conn.Close()
		t.wg.Wait()
	})
}

func (t *tunnel) rejectAfter() time.Duration {
	return t.cfg.tokey + rejectAfterTokxcCount*t.cfg.tokxc
}

// usable reports whether s may still send or receive at now (PROTOCOL.md §5).
func (t *tunnel) usable(s *session, now time.Time) bool {
	return s != nil && now.Sub(s.created) < t.rejectAfter()
}

// wallClock is the wall clock of the key exchange's timestamps.
func (t *tunnel) wallClock() time.Time { return time.Now().Add(time.Duration(t.wallSkew.Load())) }

// since returns the monotonic time of now relative to the tunnel's epoch, as stored in
// lastSent and lastReceived.
func (t *tunnel) since(now time.Time) int64 { return int64(now.Sub(t.epoch)) }

// noteCarrierError counts what went wrong on the carrier: ICMP errors reported for our
// datagrams and failed sends are maxerr's carrier errors; "packet too big" (path MTU
// news) and "no buffer space" (a full queue on this host: congestion, the datagram is
// dropped like any other congested one) are counted but are not.
func (t *tunnel) noteCarrierError(err error) {
	if joined, ok := err.(interface{ Unwrap() []error }); ok {
		for _, e := range joined.Unwrap() {
			t.noteCarrierError(e)
		}
		return
	}
	to := "the peer"
	if p := t.peer.Load(); p != nil {
		to = p.String()
	}
	n := 1
	var ue *unreachableError
	if errors.As(err, &ue) {
		n = ue.count
		err = ue.err
	}
	t.stats.carrierErrors.Add(uint64(n))
	switch {
	case errors.Is(err, syscall.EMSGSIZE):
		// Path MTU news: what it means for inner packets is logged where it is acted on.
		t.log.Debugf("carrier: sending to %s: %v (path MTU)", to, err)
		return
	case errors.Is(err, syscall.ENOBUFS):
		t.log.limitedf(&t.limits.congestion, "carrier: sending to %s: %v (congestion on this host; dropped)", to, err)
		return
	}
	t.carrierErrors.Add(int64(n))
	if ue != nil {
		t.unreachable.Store(true)
	}
	times := "once"
	if n > 1 {
		times = fmt.Sprintf("%d times", n)
	}
	t.log.limitedf(&t.limits.carrier, "carrier: sending to %s failed %s: %v", to, times, err)
}

// event hands an event to the control loop without blocking; if the queue is full the
// event is dropped, and the condition that caused it will raise it again.
func (t *tunnel) event(ev tunnelEvent) {
	select {
	case t.events <- ev:
	default:
	}
}

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
// capacity of the whole rest of the arena (for sealing by appending).
func (o *outBatch) add(n int, ttl, tos uint8) []byte {
	d := o.arena[o.used : o.used+n]
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
	mu     sync.Mutex  // guards all that follows (see tunnel.out)
	frames *frameBatch // what the last read gave

	t       *tunnel
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
	if o.maxSize > 0 && size > o.maxSize && !mayFragment(pkt) {
		// The carrier path cannot take it and its sender asked not to fragment: tell
		// the sender how much fits, as a router would.
		o.t.tooBig(pkt, o.maxSize-(size-len(pkt)))
		return
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
		copy(o.batch.add(len(pkt), ttl, tos), pkt)
		return
	}
	d := o.batch.add(size, ttl, tos)
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

func (t *tunnel) routineReadFromTUN() {
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
func (t *tunnel) sendNow(out *outbound) {
	if err := t.port.readNow(out.frames); err == nil && len(out.frames.frames) > 0 {
		t.sendFrames(out.frames.frames, out)
	}
}

// sendFrames cuts, seals and sends the frames of one read.
func (t *tunnel) sendFrames(frames []tunFrame, out *outbound) {
	peer := t.peer.Load()
	now := time.Now()
	out.session, out.packets, out.bytes = nil, 0, 0
	if t.kx != nil {
		out.session = t.keys.current.Load()
		if !t.usable(out.session, now) {
			out.session = nil
		}
	}
	if peer == nil || (t.kx != nil && out.session == nil) {
		for i := range frames {
			t.stats.dropNoSession.Add(uint64(framePackets(&frames[i])))
		}
		return
	}
	out.peer = *peer
	out.maxSize = 0
	if pmtu := t.conn.pathMTU(); pmtu > 0 {
		out.maxSize = pmtu - carrierIPv4Overhead
		if peer.Addr().Is6() {
			out.maxSize = pmtu - carrierIPv6Overhead
		}
	}
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
func (t *tunnel) flush(out *outbound) {
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

// mayFragment reports whether an inner packet may travel in a fragmented carrier packet:
// an IPv4 packet without DF. (IPv6 forbids fragmentation on the way, as DF does.)
func mayFragment(p []byte) bool {
	return len(p) >= 20 && p[0]>>4 == 4 && p[6]&0x40 == 0
}

// tooBig answers an inner packet that does not fit the carrier path with ICMP
// "fragmentation needed" (IPv4) or "packet too big" (IPv6) naming mtu, written into the
// interface towards the packet's sender; at most icmpPerSecond of them a second. Only
// the outbound loop calls it.
func (t *tunnel) tooBig(pkt []byte, mtu int) {
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

func (t *tunnel) routineReadFromCarrier() {
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
func (t *tunnel) receiveError(err error) (expected bool) {
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
// error is handled here; it returns nil unless the tunnel is stopping.
func (t *tunnel) deliver(pkts []innerPacket, holdingOut bool) error {
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

func newAnswerWatcher(t *tunnel, conn nowReceiver) *answerWatcher {
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
func (t *tunnel) watchForAnswer(out *outbound) {
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
	t      *tunnel
	nonces [2][12]byte
	held   [3]*session // current, previous, unconfirmed: the sessions a message may name
	peer   *netip.AddrPort
	now    time.Time

	// Data messages of the batch, opened by two cores when there are many (helper).
	jobs   []openJob
	helper *cryptoHelper

	packets, bytes, auth, replays, unknown, malformed uint64
	authentic                                         bool
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
	in.packets, in.bytes, in.auth, in.replays, in.unknown, in.malformed, in.authentic = 0, 0, 0, 0, 0, 0, false
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
			if t.kx == nil {
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
	if in.auth > 0 {
		t.log.limitedf(&t.limits.auth, "dropped %d data messages that failed authentication", in.auth)
	}
	return pkts
}

// sort handles the first steps of a datagram of a keyed link (PROTOCOL.md §4.1 steps 1
// and 2): key-exchange messages go to the control loop, data messages for a session we
// hold become jobs.
func (in *inbound) sort(msg []byte, from netip.AddrPort) {
	t := in.t
	if len(msg) < 2 || msg[offsetVersion] != protocolVersion {
		in.malformed++
		t.logMalformed(msg, from)
		return
	}
	switch msg[offsetType] {
	case messageInitiation, messageResponse:
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
	if in.unknown == 0 && in.held == [3]*session{} {
		// We hold no session at all, yet the sender has one with us: we lost ours (a
		// restart). The control loop may start an exchange with it (once per tokxc).
		t.event(tunnelEvent{kind: eventUnknownSession, from: from})
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
	if s == in.held[2] && t.keys.confirm(s) {
		t.event(tunnelEvent{kind: eventConfirmed, session: s, from: from})
	}
	if newest && (in.peer == nil || *in.peer != from) {
		t.event(tunnelEvent{kind: eventPeerMoved, session: s, from: from})
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

func (t *tunnel) logMalformed(msg []byte, from netip.AddrPort) {
	if len(msg) > 0 && (msg[0]>>4 == 4 || msg[0]>>4 == 6) {
		t.log.limitedf(&t.limits.plaintext, "dropped an unencrypted packet from %s (is the peer running with nokey?)", from)
		return
	}
	if t.log.debug {
		t.log.limitedf(&t.limits.malformed, "dropped a malformed datagram of %d bytes from %s", len(msg), from)
	}
}

// queueExchange copies a key-exchange message to the control loop.
func (t *tunnel) queueExchange(msg []byte, from netip.AddrPort) {
	if len(msg) > exchangeMessageSize {
		t.stats.dropMalformed.Add(1)
		return
	}
	m := exchangeMsg{n: len(msg), from: from}
	copy(m.buf[:], msg)
	select {
	case t.exchanges <- m:
	default:
		t.stats.dropExchangeQueueFull.Add(1)
	}
}

// ---------------------------------------------------------------------------------------
// Control: key exchanges, timers, link state.

func (t *tunnel) routineControl() {
	defer close(t.ctlDone)
	tick := min(t.cfg.tokxc, t.cfg.tokey)
	for _, d := range []time.Duration{t.cfg.ping, t.cfg.toping} {
		if d > 0 {
			tick = min(tick, d)
		}
	}
	tick = max(minTick, min(maxTick, tick/4))
	ticker := time.NewTicker(tick)
	defer ticker.Stop()
	if t.kx == nil {
		t.log.Printf("WARNING: nokey: traffic is sent UNENCRYPTED and UNAUTHENTICATED; use this for testing only")
		if p := t.peer.Load(); p != nil {
			t.linkUp(exchangePayload{})
		}
	} else {
		t.tick(time.Now())
	}
	for {
		select {
		case <-t.stop:
			t.shutdown()
			return
		case m := <-t.exchanges:
			t.handleExchange(&m)
		case ev := <-t.events:
			t.handleEvent(ev)
		case now := <-ticker.C:
			if t.kx != nil {
				t.tick(now)
			}
		}
	}
}

func (t *tunnel) stopping() bool {
	select {
	case <-t.stop:
		return true
	default:
		return false
	}
}

// tick watches the link (toping, maxerr), sends keepalives (ping), expires sessions and
// starts a key exchange when one is due (PROTOCOL.md §5).
func (t *tunnel) tick(now time.Time) {
	if t.keys.expire(now, t.rejectAfter()) && t.keys.current.Load() == nil {
		t.linkDown("the session keys expired and no new ones could be agreed")
	}
	if t.link.up {
		t.watchLink(now)
	}
	cur := t.keys.current.Load()
	if cur != nil && cur.initiator && !cur.received.Load() && now.Sub(t.lastAsked) >= t.cfg.tokxc/2 {
		t.askConfirmation(cur, now) // the last one, or its answer, was lost
	}
	due := cur == nil
	if cur != nil {
		age := now.Sub(cur.created)
		due = (cur.initiator && age >= t.cfg.tokey) || (!cur.initiator && age >= t.cfg.tokey+t.cfg.tokxc) ||
			cur.sendCounter.Load() >= t.rekeyAfter
	}
	if !due {
		return
	}
	var to netip.AddrPort
	if p := t.peer.Load(); p != nil {
		to = *p
	} else if next := t.keys.next.Load(); next != nil && cur == nil && now.Sub(next.created) >= t.cfg.tokxc {
		// A dynamic peer that answered an initiation but never saw it confirmed (the
		// confirming keepalive was lost) asks the same address itself.
		to = t.candidate
	}
	if to.IsValid() {
		t.initiate(now, to)
	}
}

// initiate sends a new initiation to the address, unless one was sent less than tokxc
// ago and is still waiting for its response. If the carrier reported the last one
// unreachable (the peer was not running yet), it retries after unreachableRetry already.
func (t *tunnel) initiate(now time.Time, to netip.AddrPort) {
	if p := t.kx.pending; p != nil {
		wait := t.cfg.tokxc
		if t.unreachable.Load() {
			wait = min(wait, unreachableRetry)
		}
		if now.Sub(p.sentAt) < wait {
			return
		}
	}
	t.unreachable.Store(false)
	msg, err := t.kx.initiate(now)
	if err != nil {
		t.log.Printf("cannot start a key exchange: %v", err)
		return
	}
	t.log.Debugf("sending key exchange initiation to %s", to)
	t.sendControl(msg, to)
}

// watchLink applies toping, maxerr and ping to a link that is up.
func (t *tunnel) watchLink(now time.Time) {
	silent := time.Duration(t.since(now) - t.lastReceived.Load())
	switch errs := t.carrierErrors.Load(); {
	case t.cfg.toping > 0 && silent >= t.cfg.toping:
		t.keys.clear()
		t.linkDown(fmt.Sprintf("no word from the peer for %v (toping)", silent.Round(time.Second)))
		return
	case t.cfg.maxerr >= 0 && errs > int64(t.cfg.maxerr):
		t.keys.clear()
		t.linkDown(fmt.Sprintf("%d carrier errors since the last key exchange (maxerr %d)", errs, t.cfg.maxerr))
		return
	}
	if t.cfg.ping <= 0 {
		return
	}
	idle := time.Duration(t.since(now) - t.lastSent.Load())
	switch cur := t.keys.current.Load(); {
	case silent >= t.cfg.ping && now.Sub(t.lastPing) >= t.cfg.ping:
		t.lastPing = now
		t.sendKeepalive(cur, flagPing) // the answer shows the peer is alive
	case idle >= t.cfg.ping:
		t.sendKeepalive(cur, 0) // keeps NAT mappings open
	}
}

// sendControl sends one message from the control loop.
func (t *tunnel) sendControl(msg []byte, to netip.AddrPort) {
	t.ctlMsg[0] = carrierMsg{buf: msg}
	if err := t.conn.WriteBatch(t.ctlMsg[:], to); err != nil {
		t.noteCarrierError(err)
	}
}

// sendKeepalive sends an empty data message under s to the peer.
func (t *tunnel) sendKeepalive(s *session, flags byte) {
	p := t.peer.Load()
	if s == nil || p == nil {
		return
	}
	counter, ok := s.reserveCounters(1)
	if !ok {
		return
	}
	t.sendControl(s.seal(t.ctlBuf[:], 0, flags, counter, &t.ctlNonce), *p)
	t.lastSent.Store(t.since(time.Now()))
}

func (t *tunnel) handleExchange(m *exchangeMsg) {
	msg := m.buf[:m.n]
	now := time.Now()
	if t.kx == nil {
		t.stats.dropMalformed.Add(1)
		return
	}
	switch msg[offsetType] {
	case messageInitiation:
		resp, res, err := t.kx.consumeInitiation(msg, now)
		if errors.Is(err, errCollisionWon) {
			// The peer may never have seen ours (sent before it was listening, or lost):
			// send the very same initiation again; if it did see it, it ignores the copy.
			t.log.Debugf("key exchange collision with %s: ours wins, sending it again", m.from)
			t.sendControl(t.kx.pending.message[:], m.from)
			return
		}
		if err != nil {
			t.exchangeRefused("initiation", err, m.from)
			return
		}
		res.session.peer = res.peer
		t.keys.setNext(res.session)
		t.candidate = m.from
		t.log.Debugf("answering key exchange initiation from %s", m.from)
		t.sendControl(resp, m.from)
	case messageResponse:
		res, err := t.kx.consumeResponse(msg, now)
		if err != nil {
			t.exchangeRefused("response", err, m.from)
			return
		}
		res.session.peer = res.peer
		t.keys.rotate(res.session)
		t.setPeer(m.from)
		t.sessionEstablished(res.session)
		t.askConfirmation(res.session, now)
	}
}

// askConfirmation sends a keepalive under the session we initiated: the responder takes
// the session as current when something arrives under it, and, asked for a keepalive in
// return, answers under it. Until we hear from the peer under the session, tick asks
// again every tokxc/2 (PROTOCOL.md §5): on an idle link a single lost keepalive would
// leave the responder on its old session until that expires.
func (t *tunnel) askConfirmation(s *session, now time.Time) {
	t.lastAsked = now
	t.sendKeepalive(s, flagPing)
}

// exchangeRefused logs a refused key-exchange message at a level fitting the reason.
func (t *tunnel) exchangeRefused(what string, err error, from netip.AddrPort) {
	t.stats.dropExchange.Add(1)
	switch {
	case errors.Is(err, errAuth):
		t.log.limitedf(&t.limits.auth, "key exchange %s from %s failed authentication (different key?)", what, from)
	case errors.Is(err, errStale), errors.Is(err, errNotWaiting), errors.Is(err, errMalformed):
		t.log.Debugf("key exchange %s from %s ignored: %v", what, from, err)
	default:
		t.log.limitedf(&t.limits.exchange, "key exchange %s from %s refused: %v", what, from, err)
	}
}

// setPeer makes addr the peer's carrier address, logging a change.
func (t *tunnel) setPeer(addr netip.AddrPort) {
	old := t.peer.Load()
	if old != nil && *old == addr {
		return
	}
	t.peer.Store(&addr)
	if old == nil {
		t.log.Printf("peer is %s", addr)
	} else {
		t.log.Printf("peer moved from %s to %s", *old, addr)
	}
}

// sessionEstablished records a new current session and brings the link up if it was down.
func (t *tunnel) sessionEstablished(s *session) {
	t.stats.exchanges.Add(1)
	t.viewMu.Lock()
	t.view.lastExchange, t.view.cipher = time.Now(), s.suite.String()
	t.viewMu.Unlock()
	t.carrierErrors.Store(0)
	t.lastReceived.Store(t.since(time.Now()))
	role := "responder"
	if s.initiator {
		role = "initiator"
	}
	t.log.Debugf("new session %08x/%08x (%v, we were %s)", s.localIndex, s.remoteIndex, s.suite, role)
	if !t.link.up {
		t.linkUp(s.peer)
	}
}

func (t *tunnel) handleEvent(ev tunnelEvent) {
	switch ev.kind {
	case eventConfirmed:
		t.setPeer(ev.from)
		t.sessionEstablished(ev.session)
	case eventPeerMoved:
		// Only for the session in use: a packet under an older one cannot move the peer.
		if t.kx == nil || ev.session == t.keys.current.Load() {
			t.setPeer(ev.from)
		}
		if t.kx == nil && !t.link.up {
			t.linkUp(exchangePayload{})
		}
	case eventPingRequest:
		t.sendKeepalive(t.keys.current.Load(), 0)
	case eventGoodbye:
		if ev.session == t.keys.current.Load() {
			t.keys.clear()
			t.linkDown("the peer shut down")
		}
	case eventUnknownSession:
		// Only a peer that does not know where to send initiations needs this: one that
		// does initiates on its own every tokxc.
		if t.peer.Load() == nil && t.keys.current.Load() == nil {
			t.initiate(time.Now(), ev.from)
		}
	}
}

// scriptArgs are CIPE's arguments for ip-up and ip-down (see scriptCall).
func (t *tunnel) scriptArgs(ptp netip.Addr) [6]string {
	local := t.conn.LocalAddr()
	if p := t.peer.Load(); p != nil && local.Addr().IsUnspecified() {
		local = netip.AddrPortFrom(sourceAddressFor(p.Addr(), local.Addr()), local.Port())
	}
	ptpText := ""
	if ptp.IsValid() {
		ptpText = ptp.String()
	}
	return [6]string{t.ifname, local.String(), strconv.Itoa(os.Getpid()), t.cfg.ipaddr.String(), ptpText, t.cfg.arg}
}

// sourceAddressFor asks the kernel which local address it would send to dst from.
func sourceAddressFor(dst, fallback netip.Addr) netip.Addr {
	c, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(netip.AddrPortFrom(dst, 9)))
	if err != nil {
		return fallback
	}
	defer c.Close()
	return c.LocalAddr().(*net.UDPAddr).AddrPort().Addr().Unmap()
}

func (t *tunnel) linkUp(info exchangePayload) {
	ptp := t.cfg.ptpaddr
	if !ptp.IsValid() && info.addr.IsValid() {
		ptp = info.addr
		t.peerTunnelAddr.Store(&ptp)
		if t.ifindex != 0 && ptp != t.link.configuredPtp {
			if err := t.setInterfacePeer(ptp); err != nil {
				t.log.Printf("cannot set the learned peer address %s on the interface: %v", ptp, err)
			} else {
				t.log.Printf("learned the peer's tunnel address %s", ptp)
			}
		}
	}
	if info.mtu != 0 && int(info.mtu) != t.cfg.mtu {
		t.log.Printf("warning: the peer's mtu is %d, ours is %d; packets larger than the smaller one are lost", info.mtu, t.cfg.mtu)
	}
	t.link = linkState{up: true, since: time.Now(), args: t.scriptArgs(ptp), configuredPtp: t.link.configuredPtp, peerInfo: info}
	t.up.Store(true)
	peer := "unknown"
	if p := t.peer.Load(); p != nil {
		peer = p.String()
	}
	cipher := "none (nokey)"
	if cur := t.keys.current.Load(); cur != nil {
		cipher = cur.suite.String()
	}
	t.link.env = []string{"CIPED_PEER=" + peer, "CIPED_CIPHER=" + cipher, "CIPED_MTU=" + strconv.Itoa(t.cfg.mtu),
		"CIPED_NETNS=" + strconv.FormatUint(netnsID(), 10)}
	t.log.Printf("link up: peer %s, cipher %s", peer, cipher)
	t.viewMu.Lock()
	t.view.up, t.view.since, t.view.cipher, t.view.ptp = true, t.link.since, cipher, t.link.args[4]
	t.viewMu.Unlock()
	t.linkChanged(fmt.Sprintf("link up, peer %s, cipher %s", peer, cipher))
	t.scripts.enqueue(scriptCall{name: "ip-up", path: t.cfg.ipup, args: t.link.args, env: t.link.env})
}

func (t *tunnel) linkDown(reason string) {
	if !t.link.up {
		return
	}
	t.link.up = false
	t.up.Store(false)
	t.log.Printf("link down: %s", reason)
	t.viewMu.Lock()
	t.view.up, t.view.since = false, time.Now()
	t.viewMu.Unlock()
	t.linkChanged("link down: " + reason)
	env := append(append([]string(nil), t.link.env...), "CIPED_REASON="+reason)
	t.scripts.enqueue(scriptCall{name: "ip-down", path: t.cfg.ipdown, args: t.link.args, env: env})
}

// linkChanged tells the hook, if any, of a change of the link.
func (t *tunnel) linkChanged(status string) {
	if t.onLinkChange != nil {
		t.onLinkChange(status)
	}
}

// logStatus writes the link's status to the log (on SIGUSR1).
func (t *tunnel) logStatus() {
	var b strings.Builder
	formatStatus(&b, t.report(), netnsID())
	for _, line := range strings.Split(strings.TrimSpace(b.String()), "\n") {
		t.log.Printf("status: %s", strings.TrimSpace(line))
	}
}

// setInterfacePeer replaces the interface address with one that names ptp as its peer.
func (t *tunnel) setInterfacePeer(ptp netip.Addr) error {
	if err := deleteAddress(t.ifindex, t.cfg.ipaddr, t.link.configuredPtp); err != nil {
		return err
	}
	if err := addAddress(t.ifindex, t.cfg.ipaddr, ptp, t.cfg.metric); err != nil {
		return err
	}
	t.link.configuredPtp = ptp
	return nil
}

// shutdown tells the peer, takes the link down and forgets the keys.
func (t *tunnel) shutdown() {
	if t.kx != nil {
		t.sendKeepalive(t.keys.current.Load(), flagGoodbye)
	}
	t.linkDown("shutting down")
	t.keys.clear()
}
