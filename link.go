package main

// The link's life: the control loop (RoutineControl, one goroutine) and everything only it
// touches. It runs the key exchanges and the link's timers (tick: rekeying, retries,
// confirmation, expiry), keeps the link state machine (up or down, why, since), watches
// liveness (ping, toping, maxerr), runs the scripts, keeps the status view and tells the
// notify hook of changes. It talks to the packet path (tunnel.go) only through the core:
// it publishes sessions and the peer's addresses there, reads the liveness timestamps and
// counters, and receives key-exchange messages and events from the data loops through the
// core's two queues. It sends its own few messages (initiations, responses, keepalives)
// through the carrier, which is safe for concurrent use.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.zx2c4.com/wireguard/tun"
)

const (
	minTick, maxTick   = 10 * time.Millisecond, time.Second // the control loop's timer
	firstRetry         = time.Second                        // an unanswered initiation is sent again after this, then twice as long, up to tokxc
	unknownSessionRate = 4                                  // unknown-session messages we send a second, at most
	staleLogInterval   = time.Minute                        // at most one line a minute about old initiations
	errorProbeWait     = 250 * time.Millisecond             // between liveness probes after carrier errors, at least
	errorProbeWaitMax  = 2 * time.Second                    // ... and at most (three round trips in between)
	errorProbes        = 5                                  // unanswered liveness probes before maxerr may end the link
)

// linkLife is one running link: its packet path and its life. Make one with newLink, start
// it with start, stop it with close.
type linkLife struct {
	*linkCore
	data    *packetPath
	ifindex int          // 0: do not configure the interface (in-process tests)
	kx      *keyExchange // nil with nokey
	scripts *scriptRunner
	routes  *routeWatcher // nil: no source filter

	// rekeyAfter is the number of packets sent under a session before a new exchange;
	// tests lower it before start.
	rekeyAfter uint64
	// wallSkew is added to the wall clock the key exchange reads (its only use of the
	// wall clock: timers run on the monotonic clock); tests jump it.
	wallSkew atomic.Int64

	// What readers outside the control loop may know of the link (status), and a hook
	// told of link changes (systemd's STATUS line).
	viewMu       sync.Mutex
	view         linkView
	meter        rateMeter
	onLinkChange func(status string)

	// Control loop state.
	state        linkState
	answered     map[*session]exchangePayload // what the peer said in the exchanges we answered, until confirmed
	exchangeFrom netip.AddrPort               // where the message being handled came from
	toldUnknown  *session                     // the session the peer last said it does not hold
	peerLost     bool                         // the peer said so: exchange at once, and again, until one completes
	retry        time.Duration                // the wait before an unanswered initiation is sent again
	rtt          time.Duration                // the smoothed round trip of key exchanges; 0: none yet
	lastPing     time.Time                    // when we last asked the peer for a keepalive
	lastAsked    time.Time                    // when we last asked the peer to confirm our new session
	staleLimit   rateLimit                    // lines about initiations with old timestamps
	unknownLimit rateLimit                    // unknown-session messages we send
	ctlBuf       [dataOverhead + probeAckSize]byte
	ctlNonce     [12]byte
	ctlMsg       [1]carrierMsg
	kxMsgs       [exchangeParts]carrierMsg

	// Path MTU (pmtu.go): the search, and where its probes are sealed.
	prober     *pathProber
	probeBuf   []byte
	probeZeros []byte
	lastPath   int            // the path size last published to the packet path
	pathPeer   netip.AddrPort // the peer address the size was found for

	// Liveness under carrier errors (maxerr): errors about datagrams to the peer make the
	// control loop ask the peer, authenticated, every errorProbeWait; only when it does
	// not answer do the errors count.
	errSeen    int64     // carrierErrors already looked at
	errOpen    int64     // errors since the peer was last heard from after a probe
	errProbeAt time.Time // when the last liveness probe went out; zero: none outstanding
	errProbes  int       // liveness probes since the peer was last heard from

	timer *time.Timer // wakes the control loop for the next probe
	// settings are the options as they are now (opt); reloads carries new ones to the
	// control loop, which alone stores them.
	settings atomic.Pointer[config]
	reloads  chan reloadRequest
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

// linkView is what the control loop knows of the link, copied out for readers under
// viewMu whenever it changes (rarely: link up and down, key exchanges).
type linkView struct {
	up           bool
	since        time.Time
	lastExchange time.Time
	cipher       string
	ptp          string
}

// newLink builds a link over an open TUN device (read and written through port) and
// carrier. ifindex 0 skips interface configuration.
func newLink(cfg *config, log *logger, dev tun.Device, port tunPort, conn carrier, ifname string, ifindex int) *linkLife {
	c := newLinkCore(cfg, log, conn, ifname)
	l := &linkLife{linkCore: c, data: newPacketPath(c, dev, port), ifindex: ifindex, rekeyAfter: rekeyAfterPackets,
		answered: map[*session]exchangePayload{}, ctlDone: make(chan struct{}), reloads: make(chan reloadRequest)}
	l.settings.Store(cfg)
	if cfg.key != nil {
		l.kx = &keyExchange{
			cfg: exchangeConfig{secrets: deriveLinkSecrets(*cfg.key), ciphers: cfg.ciphers, mtu: cfg.mtu,
				addr: cfg.ipaddr, expected: cfg.ptpaddr, tokxts: cfg.tokxts},
			wallClock:  l.wallClock,
			indexInUse: l.keys.holdsIndex,
			acceptAddr: l.learnable,
		}
		if cfg.oldkey != nil {
			old := deriveLinkSecrets(*cfg.oldkey)
			l.kx.cfg.old = &old
		}
	}
	header := carrierIPv4Overhead
	if cfg.me.Addr().Is6() {
		header = carrierIPv6Overhead
	}
	if cfg.socks.IsValid() {
		header += socksHeaderSize(cfg.peer.Addr())
	}
	largest := cfg.mtu
	if cfg.key != nil {
		largest += dataOverhead
	}
	l.prober = newPathProber(largest, header, cfg.me.Addr().Is6(), cfg.key == nil)
	l.probeBuf, l.probeZeros = make([]byte, largest), make([]byte, largest)
	l.lastPath = largest
	l.pathMax.Store(int32(largest))
	l.staleLimit.interval = staleLogInterval
	l.retry = min(firstRetry, cfg.tokxc)
	l.unknownLimit.interval = time.Second / unknownSessionRate
	l.state.configuredPtp = cfg.ptpaddr
	if cfg.ptpaddr.IsValid() {
		l.view.ptp = cfg.ptpaddr.String()
	}
	l.scripts = newScriptRunner(log)
	return l
}

// filterSources turns on the inner source filter (rpfilter): the routes through the
// interface are read now and followed from then on. It must be called before start.
func (l *linkLife) filterSources() error {
	w, err := watchRoutes(l.ifindex, l.sources.Store, l.log)
	if err != nil {
		return err
	}
	l.routes = w
	return nil
}

// start runs the data loops, the control loop and the watch on the interface's events.
func (l *linkLife) start() {
	l.data.start()
	l.wg.Add(2)
	go func() { defer l.wg.Done(); l.routineControl() }()
	go func() { defer l.wg.Done(); l.routineInterfaceEvents() }()
}

// close takes the link down (ip-down, goodbye to the peer), waits for the scripts,
// closes the device and the socket and waits for every goroutine. It may be called more
// than once; every call returns when all is done.
func (l *linkLife) close() {
	l.stopOnce.Do(func() {
		close(l.stop)
		<-l.ctlDone
		l.scripts.close()
		if l.routes != nil {
			l.routes.close()
		}
		l.data.tun.Close()
		l.conn.Close()
		l.data.wait()
		l.wg.Wait()
	})
}

// routineInterfaceEvents logs what the device reports: an MTU changed from outside, the
// interface going down. It ends when the device is closed.
func (l *linkLife) routineInterfaceEvents() {
	for ev := range l.data.tun.Events() {
		if ev&tun.EventMTUUpdate != 0 {
			if mtu, err := l.data.tun.MTU(); err == nil && mtu != l.cfg.mtu {
				l.log.Printf("warning: the interface MTU was changed to %d from outside; ciped sends and receives at most mtu=%d", mtu, l.cfg.mtu)
			}
		}
		if ev&tun.EventDown != 0 {
			l.log.Debugf("the interface is down")
		}
	}
}

// rejectAfter is the lifetime of a session (PROTOCOL.md §5).
func (l *linkLife) rejectAfter() time.Duration { return time.Duration(l.lifetime.Load()) }

// opt is the link's settings as they are now: those a reload may change (timers,
// scripts, keys, cipher, debug) come from here, the rest from the core's fixed cfg. Safe
// for concurrent use.
func (l *linkLife) opt() *config { return l.settings.Load() }

// tickInterval is the control loop's timer for the settings: a quarter of the shortest
// of its intervals, within minTick and maxTick.
func tickInterval(c *config) time.Duration {
	tick := min(c.tokxc, c.tokey)
	for _, d := range []time.Duration{c.ping, c.toping} {
		if d > 0 {
			tick = min(tick, d)
		}
	}
	return max(minTick, min(maxTick, tick/4))
}

// reloadRequest carries new settings to the control loop; done is closed once they
// apply.
type reloadRequest struct {
	cfg  *config
	done chan struct{}
}

// reload makes next the link's settings, without touching the interface or the session
// (PROTOCOL.md is unaffected: the next exchange uses the new key and ciphers). Options
// that cannot change on a running link make it refuse the whole of next. It returns the
// names of the options that changed. Safe to call from any goroutine but the control
// loop.
func (l *linkLife) reload(next *config) (changed []string, err error) {
	cur := l.opt()
	if fixed := fixedChanges(cur, next); len(fixed) > 0 {
		return nil, fmt.Errorf("%s cannot change on a running link (restart ciped for that); nothing was changed",
			strings.Join(fixed, ", "))
	}
	done := make(chan struct{})
	select {
	case l.reloads <- reloadRequest{cfg: next, done: done}:
	case <-l.stop:
		return nil, errors.New("the link is stopping")
	}
	select {
	case <-done:
	case <-l.ctlDone:
		return nil, errors.New("the link is stopping")
	}
	return liveChanges(cur, next), nil
}

// apply puts new settings in place; the control loop calls it.
func (l *linkLife) apply(next *config) {
	l.settings.Store(next)
	l.log.debug.Store(next.debug)
	l.lifetime.Store(int64(sessionLifetime(next.tokey, next.tokxc)))
	if l.kx != nil {
		l.kx.cfg.secrets, l.kx.cfg.old = deriveLinkSecrets(*next.key), nil
		if next.oldkey != nil {
			old := deriveLinkSecrets(*next.oldkey)
			l.kx.cfg.old = &old
		}
		l.kx.cfg.ciphers, l.kx.cfg.tokxts = next.ciphers, next.tokxts
	}
}

// fixedChanges names the options that differ between two settings and cannot change on
// a running link.
func fixedChanges(a, b *config) []string {
	var names []string
	for _, c := range []struct {
		name string
		same bool
	}{
		{"nokey", (a.key == nil) == (b.key == nil)}, {"me", a.me == b.me}, {"peer", a.peer == b.peer},
		{"ipaddr", a.ipaddr == b.ipaddr}, {"ptpaddr", a.ptpaddr == b.ptpaddr && a.ptpRange == b.ptpRange},
		{"mtu", a.mtu == b.mtu}, {"cttl", a.cttl == b.cttl}, {"metric", a.metric == b.metric},
		{"device", a.device == b.device}, {"syslog", a.syslog == b.syslog}, {"socks", a.socks == b.socks},
		{"rpfilter", a.rpfilter == b.rpfilter}, {"tunoffload", a.tunOffload == b.tunOffload},
		{"udpgso", a.udpGSO == b.udpGSO}, {"udpgro", a.udpGRO == b.udpGRO},
	} {
		if !c.same {
			names = append(names, c.name)
		}
	}
	return names
}

// liveChanges names the options that differ between two settings and change on a
// running link.
func liveChanges(a, b *config) []string {
	sameKey := func(x, y *[linkKeySize]byte) bool { return (x == nil) == (y == nil) && (x == nil || *x == *y) }
	var names []string
	for _, c := range []struct {
		name string
		same bool
	}{
		{"key", sameKey(a.key, b.key)}, {"oldkey", sameKey(a.oldkey, b.oldkey)}, {"cipher", a.ciphers == b.ciphers},
		{"tokxc", a.tokxc == b.tokxc}, {"tokey", a.tokey == b.tokey}, {"tokxts", a.tokxts == b.tokxts},
		{"ping", a.ping == b.ping}, {"toping", a.toping == b.toping}, {"maxerr", a.maxerr == b.maxerr},
		{"ipup", a.ipup == b.ipup}, {"ipdown", a.ipdown == b.ipdown}, {"arg", a.arg == b.arg}, {"debug", a.debug == b.debug},
	} {
		if !c.same {
			names = append(names, c.name)
		}
	}
	return names
}

// wallClock is the wall clock of the key exchange's timestamps.
func (l *linkLife) wallClock() time.Time { return time.Now().Add(time.Duration(l.wallSkew.Load())) }

// report takes a snapshot of the link for status readers. It may be called from any
// goroutine.
func (l *linkLife) report() statusReport {
	l.viewMu.Lock()
	v := l.view
	l.viewMu.Unlock()
	s := &l.stats
	r := statusReport{
		Interface: l.ifname, PID: os.Getpid(), Netns: netnsID(), Version: versionString(),
		Link: "down", Since: v.since, Local: l.conn.LocalAddr().String(),
		TunnelAddress: l.cfg.ipaddr.String(), PeerAddress: v.ptp, MTU: l.cfg.mtu,
		Cipher: v.cipher, LastExchange: v.lastExchange, KeyExchanges: s.exchanges.Load(),
		Sent:     trafficCounts{Packets: s.txPackets.Load(), Bytes: s.txBytes.Load()},
		Received: trafficCounts{Packets: s.rxPackets.Load(), Bytes: s.rxBytes.Load()},
		Dropped: droppedCounts{Auth: s.dropAuth.Load(), Replay: s.dropReplay.Load(), Malformed: s.dropMalformed.Load(),
			UnknownSession: s.dropUnknown.Load(), NoSession: s.dropNoSession.Load(), TooBig: s.dropTooBig.Load(),
			Source: s.dropSource.Load(), KeyExchange: s.dropExchange.Load() + s.dropExchangeQueueFull.Load()},
		Errors: errorCounts{Carrier: s.carrierErrors.Load(), ForeignICMP: s.carrierForeign.Load(), Interface: s.tunErrors.Load()},
		Time:   time.Now(),
		Options: statusSettings{Tokey: l.opt().tokey.String(), Tokxc: l.opt().tokxc.String(), Ping: l.opt().ping.String(),
			Toping: l.opt().toping.String(), Maxerr: l.opt().maxerr},
	}
	if v.up {
		r.Link = "up"
	}
	if p := l.peer.Load(); p != nil {
		r.Peer = p.String()
	}
	if heard := l.lastReceived.Load(); heard > 0 {
		r.LastReceived = l.epoch.Add(time.Duration(heard))
	}
	r.PathMTU = int(l.pathMax.Load()) + l.prober.header
	r.Rates = l.meter.rates(r.Time, s.txBytes.Load(), s.rxBytes.Load())
	return r
}

// rateMeter keeps a second-by-second record of the byte counters over the last
// rateWindow, for the rates of the status report. Safe for concurrent use.
type rateMeter struct {
	mu      sync.Mutex
	samples [rateWindow + 1]rateSample
	next    int
}

type rateSample struct {
	at     time.Time
	tx, rx uint64
}

const rateWindow = 10 // seconds the rates are taken over

// record notes the counters at now, once a second at most.
func (m *rateMeter) record(now time.Time, tx, rx uint64) {
	m.mu.Lock()
	defer m.mu.Unlock()
	last := m.samples[(m.next+len(m.samples)-1)%len(m.samples)]
	if !last.at.IsZero() && now.Sub(last.at) < time.Second {
		return
	}
	m.samples[m.next] = rateSample{at: now, tx: tx, rx: rx}
	m.next = (m.next + 1) % len(m.samples)
}

// rates are the bytes per second from the oldest sample kept to the counters at now.
func (m *rateMeter) rates(now time.Time, tx, rx uint64) rates {
	m.mu.Lock()
	defer m.mu.Unlock()
	oldest := m.samples[m.next]
	if oldest.at.IsZero() {
		oldest = m.samples[0]
	}
	secs := now.Sub(oldest.at).Seconds()
	if oldest.at.IsZero() || secs <= 0 {
		return rates{}
	}
	return rates{Sent: float64(tx-oldest.tx) / secs, Received: float64(rx-oldest.rx) / secs}
}

// ---------------------------------------------------------------------------------------
// The control loop.

func (l *linkLife) routineControl() {
	defer close(l.ctlDone)
	ticker := time.NewTicker(tickInterval(l.opt()))
	defer ticker.Stop()
	l.meter.record(time.Now(), 0, 0)
	l.timer = time.NewTimer(time.Hour)
	defer l.timer.Stop()
	if l.kx == nil {
		l.log.Printf("WARNING: nokey: traffic is sent UNENCRYPTED and UNAUTHENTICATED; use this for testing only")
		if p := l.peer.Load(); p != nil {
			l.linkUp(exchangePayload{})
		}
	} else {
		l.tick(time.Now())
	}
	for {
		select {
		case <-l.stop:
			l.shutdown()
			return
		case m := <-l.exchanges:
			// The inbound loop queues events and key-exchange messages in the order the
			// datagrams came, on two queues: what it queued as an event before this
			// message waits there now, and goes first (a goodbye before the initiation
			// of the peer's next life).
			l.drainEvents()
			l.handleExchange(&m)
		case ev := <-l.events:
			l.handleEvent(ev)
		case now := <-ticker.C:
			if l.kx != nil {
				l.tick(now)
			}
			l.meter.record(now, l.stats.txBytes.Load(), l.stats.rxBytes.Load())
			l.checkCarrier(now)
		case now := <-l.timer.C:
			l.checkCarrier(now)
		case r := <-l.reloads:
			l.apply(r.cfg)
			ticker.Reset(tickInterval(r.cfg))
			close(r.done)
		}
		l.schedule()
	}
}

// drainEvents handles the events waiting on the queue, without waiting for more.
func (l *linkLife) drainEvents() {
	for {
		select {
		case ev := <-l.events:
			l.handleEvent(ev)
		default:
			return
		}
	}
}

// schedule sets the timer to the next moment a probe may be due.
func (l *linkLife) schedule() {
	var next time.Time
	if l.state.up {
		next = l.prober.nextAt()
	}
	if !l.errProbeAt.IsZero() {
		if at := l.errProbeAt.Add(l.errorWait()); next.IsZero() || at.Before(next) {
			next = at
		}
	}
	if !next.IsZero() {
		l.timer.Reset(max(time.Until(next), minTick))
	}
}

// checkCarrier looks at what the carrier reported since the last look: path hints go to
// the path MTU search, errors about datagrams to the peer to the liveness probes.
func (l *linkLife) checkCarrier(now time.Time) {
	l.carrierNews.Store(false)
	if mtu := l.localMTU.Swap(0); mtu > 0 {
		l.prober.hint(now, int(mtu), true)
	}
	if mtu := l.pathHint.Swap(0); mtu > 0 && l.state.up {
		l.log.Debugf("the network reports that the path to the peer takes packets of %d bytes at most: checking", mtu)
		l.prober.hint(now, int(mtu), false)
	}
	l.watchErrors(now)
	if l.state.up && l.kx != nil {
		busy := time.Duration(l.since(now)-l.lastSent.Load()) < probeConfirm
		for _, size := range l.prober.tick(now, busy) {
			l.sendProbe(size)
		}
	}
	l.publishPath()
}

// watchErrors applies maxerr: carrier errors about datagrams to the peer (which anyone
// on the way can forge) only make us ask the peer whether it is there, with a keepalive
// that asks for one back, every errorProbeWait. An answer forgives them. The link goes
// down only when more than maxerr errors came and errorProbes probes went unanswered.
func (l *linkLife) watchErrors(now time.Time) {
	n := l.carrierErrors.Load()
	fresh := n - l.errSeen
	l.errSeen = n
	if !l.errProbeAt.IsZero() && l.lastReceived.Load() > l.since(l.errProbeAt) {
		l.errOpen, l.errProbes, l.errProbeAt = 0, 0, time.Time{} // the peer answered
	}
	if !l.state.up || l.kx == nil {
		l.errOpen, l.errProbes, l.errProbeAt = 0, 0, time.Time{}
		return
	}
	l.errOpen += fresh
	if l.errOpen == 0 || (!l.errProbeAt.IsZero() && now.Sub(l.errProbeAt) < l.errorWait()) {
		return
	}
	if l.opt().maxerr >= 0 && l.errOpen > int64(l.opt().maxerr) && l.errProbes >= errorProbes {
		errs, probes := l.errOpen, l.errProbes
		l.keys.clear()
		l.linkDown(fmt.Sprintf("%d carrier errors, and %d probes unanswered, since the peer was last heard from (maxerr %d)",
			errs, probes, l.opt().maxerr))
		return
	}
	l.errProbes++
	l.errProbeAt = now
	l.sendKeepalive(l.keys.current.Load(), flagPing)
}

// startPath begins path MTU discovery on a link that came up or a peer that moved: the
// size found stays if the peer is where it was found.
func (l *linkLife) startPath() {
	p := l.peer.Load()
	fresh := p == nil || *p != l.pathPeer
	if p != nil {
		l.pathPeer = *p
	}
	l.prober.start(time.Now(), fresh)
	l.publishPath()
}

// errorWait is the wait between liveness probes: three round trips, within
// errorProbeWait and errorProbeWaitMax.
func (l *linkLife) errorWait() time.Duration {
	return min(errorProbeWaitMax, max(errorProbeWait, 3*max(l.rtt, l.prober.rtt)))
}

// noteRTT takes a round-trip sample (an initiation and its response).
func (l *linkLife) noteRTT(sample time.Duration) {
	if l.rtt == 0 {
		l.rtt = sample
	} else {
		l.rtt += (sample - l.rtt) / 8
	}
}

// publishPath tells the packet path the largest message the path takes, logging a change.
func (l *linkLife) publishPath() {
	size := l.prober.current
	if size == l.lastPath {
		return
	}
	inner := size
	if l.kx != nil {
		inner -= dataOverhead
	}
	l.log.Printf("path MTU: the path to the peer takes %d-byte packets (messages of %d bytes, inner packets of %d); was %d",
		size+l.prober.header, size, inner, l.lastPath+l.prober.header)
	l.lastPath = size
	l.pathMax.Store(int32(size))
}

// sendProbe sends a path MTU probe (PROTOCOL.md §4.6): a message of size bytes under the
// current session, padding inside.
func (l *linkLife) sendProbe(size int) {
	s, p := l.keys.current.Load(), l.peer.Load()
	if s == nil || p == nil || size < dataOverhead || size > len(l.probeBuf) {
		return
	}
	counter, ok := s.reserveCounters(1)
	if !ok {
		return
	}
	l.log.Debugf("path MTU: probing with a %d-byte message", size)
	l.sendControl(s.sealTo(l.probeBuf, l.probeZeros[:size-dataOverhead], flagProbe, counter, &l.ctlNonce), *p)
}

// ackProbe tells the peer that its probe of size bytes arrived.
func (l *linkLife) ackProbe(size int) {
	s, p := l.keys.current.Load(), l.peer.Load()
	if s == nil || p == nil {
		return
	}
	counter, ok := s.reserveCounters(1)
	if !ok {
		return
	}
	var b [probeAckSize]byte
	binary.BigEndian.PutUint32(b[:], uint32(size))
	l.sendControl(s.sealTo(l.ctlBuf[:], b[:], flagProbeAck, counter, &l.ctlNonce), *p)
}

// tick watches the link (toping, maxerr), sends keepalives (ping), expires sessions and
// starts a key exchange when one is due (PROTOCOL.md §5).
func (l *linkLife) tick(now time.Time) {
	if l.keys.expire(now, l.rejectAfter()) && l.keys.current.Load() == nil {
		l.linkDown("the session keys expired and no new ones could be agreed")
	}
	if l.state.up {
		l.watchLink(now)
	}
	cur := l.keys.current.Load()
	if cur != nil && cur.initiator && !cur.received.Load() && now.Sub(l.lastAsked) >= l.opt().tokxc/2 {
		l.askConfirmation(cur, now) // the last one, or its answer, was lost
	}
	due := cur == nil || l.peerLost
	if cur != nil && !due {
		age := now.Sub(cur.created)
		due = (cur.initiator && age >= l.opt().tokey) || (!cur.initiator && age >= l.opt().tokey+l.opt().tokxc) ||
			cur.sendCounter.Load() >= l.rekeyAfter
	}
	if !due {
		return
	}
	// Only to an address the peer proved its own (configured, or an authentic message
	// came from it while the link was up): a dynamic peer that knows none waits.
	if p := l.peer.Load(); p != nil {
		l.initiate(now, *p)
	}
}

// initiate sends a new initiation to the address, unless the last one is still waiting
// for its response: an unanswered one is sent again (anew) after firstRetry, then after
// twice as long each time, up to tokxc; a completed exchange starts the count again.
// (So a peer that was not running yet is reached within a second or two of its start,
// with no ICMP error needed, which anyone could forge.)
func (l *linkLife) initiate(now time.Time, to netip.AddrPort) {
	if p := l.kx.pending; p != nil {
		if now.Sub(p.sentAt) < l.retry {
			return
		}
		l.retry = min(2*l.retry, l.opt().tokxc)
	}
	parts, err := l.kx.initiate(now)
	if err != nil {
		l.log.Printf("cannot start a key exchange: %v", err)
		return
	}
	l.pendingIndex.Store(l.kx.pending.index)
	l.log.Debugf("sending key exchange initiation to %s", to)
	l.sendExchange(parts, to)
}

// watchLink applies toping and ping to a link that is up (maxerr: watchErrors).
func (l *linkLife) watchLink(now time.Time) {
	silent := time.Duration(l.since(now) - l.lastReceived.Load())
	if l.opt().toping > 0 && silent >= l.opt().toping {
		l.keys.clear()
		l.linkDown(fmt.Sprintf("no word from the peer for %v (toping)", silent.Round(time.Second)))
		return
	}
	if l.opt().ping <= 0 {
		return
	}
	idle := time.Duration(l.since(now) - l.lastSent.Load())
	switch cur := l.keys.current.Load(); {
	case silent >= l.opt().ping && now.Sub(l.lastPing) >= l.opt().ping:
		l.lastPing = now
		l.sendKeepalive(cur, flagPing) // the answer shows the peer is alive
	case idle >= l.opt().ping:
		l.sendKeepalive(cur, 0) // keeps NAT mappings open
	}
}

// sendExchange sends the parts of a key-exchange message (PROTOCOL.md §3), in order,
// each free to be fragmented on an IPv4 path smaller than it.
func (l *linkLife) sendExchange(parts [][]byte, to netip.AddrPort) {
	for i, p := range parts {
		l.kxMsgs[i] = carrierMsg{buf: p, frag: true}
	}
	if err := l.conn.WriteBatch(l.kxMsgs[:len(parts)], to); err != nil {
		l.noteCarrierError(err)
	}
}

// sendControl sends one message from the control loop.
func (l *linkLife) sendControl(msg []byte, to netip.AddrPort) {
	l.ctlMsg[0] = carrierMsg{buf: msg}
	if err := l.conn.WriteBatch(l.ctlMsg[:], to); err != nil {
		l.noteCarrierError(err)
	}
}

// sendKeepalive sends an empty data message under s to the peer.
func (l *linkLife) sendKeepalive(s *session, flags byte) {
	p := l.peer.Load()
	if s == nil || p == nil {
		return
	}
	counter, ok := s.reserveCounters(1)
	if !ok {
		return
	}
	l.sendControl(s.seal(l.ctlBuf[:], 0, flags, counter, &l.ctlNonce), *p)
	l.lastSent.Store(l.since(time.Now()))
}

func (l *linkLife) handleExchange(m *exchangeMsg) {
	msg := m.buf[:m.n]
	now := time.Now()
	if l.kx == nil {
		l.stats.dropMalformed.Add(1)
		return
	}
	l.exchangeFrom = m.from
	if msg[offsetVersion] == protocolVersion1 {
		if l.kx.speaksVersion1(msg) {
			l.stats.dropExchange.Add(1)
			l.log.limitedf(&l.limits.version1, "peer at %s speaks protocol version 1: upgrade it "+
				"(this ciped speaks version 2; the initiation was under this link key, unless it is a recording of an old one)", m.from)
		} else {
			l.stats.dropMalformed.Add(1)
		}
		return
	}
	switch msg[offsetType] {
	case messageInitiation:
		resp, res, err := l.kx.consumeInitiation(msg, m.from, now)
		if errors.Is(err, errCollisionWon) {
			// The peer may never have seen ours (sent before it was listening, or lost):
			// send the very same initiation again; if it did see it, it ignores the copy.
			l.log.Debugf("key exchange collision with %s: ours wins, sending it again", m.from)
			l.sendExchange(l.kx.pendingParts(), m.from)
			return
		}
		if err != nil {
			l.exchangeRefused("initiation", err, m.from)
			return
		}
		l.pendingIndex.Store(0) // ours, if any, is abandoned
		l.keys.setNext(res.session)
		l.answered[res.session] = res.peer
		for s := range l.answered { // only the sessions still held (at most three)
			if !l.keys.holdsIndex(s.localIndex) {
				delete(l.answered, s)
			}
		}
		l.log.Debugf("answering key exchange initiation from %s", m.from)
		l.sendExchange(resp, m.from)
	case messageResponse:
		pending := l.kx.pending
		res, err := l.kx.consumeResponse(msg, m.from, now)
		if err != nil {
			l.exchangeRefused("response", err, m.from)
			return
		}
		l.noteRTT(now.Sub(pending.sentAt))
		l.pendingIndex.Store(0)
		l.keys.rotate(res.session)
		l.setPeer(m.from)
		l.sessionEstablished(res.session, res.peer)
		l.askConfirmation(res.session, now)
	case messageUnknownSession:
		l.handleUnknownSession(msg, m.from, now)
	}
}

// handleUnknownSession acts on the peer's word that it holds no session for what we
// sent (PROTOCOL.md §4.5): it lost its sessions (a restart) and cannot initiate itself,
// as it does not know our address. If the message names the session we send under and
// a counter we used, we start an exchange at once; once per session, so that a
// recorded one replayed costs us at most one exchange.
func (l *linkLife) handleUnknownSession(msg []byte, from netip.AddrPort, now time.Time) {
	receiver, counter, err := l.kx.consumeUnknownSession(msg)
	if err != nil {
		l.exchangeRefused("unknown-session message", err, from)
		return
	}
	cur, peer := l.keys.current.Load(), l.peer.Load()
	if cur == nil || peer == nil || receiver != cur.remoteIndex || counter >= cur.sendCounter.Load() || cur == l.toldUnknown {
		l.stats.dropExchange.Add(1)
		l.log.Debugf("unknown-session message from %s ignored (not about the session we send under)", from)
		return
	}
	l.toldUnknown, l.peerLost = cur, true
	l.log.Printf("the peer at %s lost our session (restarted?): starting a key exchange", from)
	l.initiate(now, *peer)
}

// askConfirmation sends a keepalive under the session we initiated: the responder takes
// the session as current when something arrives under it, and, asked for a keepalive in
// return, answers under it. Until we hear from the peer under the session, tick asks
// again every tokxc/2 (PROTOCOL.md §5): on an idle link a single lost keepalive would
// leave the responder on its old session until that expires.
func (l *linkLife) askConfirmation(s *session, now time.Time) {
	l.lastAsked = now
	l.sendKeepalive(s, flagPing)
}

// exchangeRefused logs a refused key-exchange message at a level fitting the reason.
func (l *linkLife) exchangeRefused(what string, err error, from netip.AddrPort) {
	switch {
	case errors.Is(err, errAwaitingPart):
		return
	case errors.Is(err, errAbandoned), errors.Is(err, errDuplicate), errors.Is(err, errSuperseded):
		// expected after a collision, a retry or reordering: not refusals
		l.log.Debugf("key exchange %s from %s ignored: %v", what, from, err)
		return
	}
	l.stats.dropExchange.Add(1)
	switch {
	case errors.Is(err, errAuth):
		l.log.limitedf(&l.limits.auth, "key exchange %s from %s failed authentication (different key?)", what, from)
	case errors.Is(err, errStale):
		// A replay, or a peer whose clock went back across its restart: say so, now and
		// then, at the normal level: a link that cannot come up needs this line.
		l.log.limitedf(&l.staleLimit, "key exchange %s from %s refused: %v; if the peer restarted with its clock "+
			"set back, it is accepted once that clock passes the last one accepted, or restart this ciped", what, from, err)
	case errors.Is(err, errNotWaiting), errors.Is(err, errMalformed):
		l.log.Debugf("key exchange %s from %s ignored: %v", what, from, err)
	default:
		l.log.limitedf(&l.limits.exchange, "key exchange %s from %s refused: %v", what, from, err)
	}
}

// setPeer makes addr the peer's carrier address, logging a change.
func (l *linkLife) setPeer(addr netip.AddrPort) {
	old := l.peer.Load()
	if old != nil && *old == addr {
		return
	}
	l.peer.Store(&addr)
	if old == nil {
		l.log.Printf("peer is %s", addr)
	} else {
		l.log.Printf("peer moved from %s to %s", *old, addr)
	}
}

// sessionEstablished records a new current session, made by an exchange in which the
// peer told us info, and brings the link up if it was down.
func (l *linkLife) sessionEstablished(s *session, info exchangePayload) {
	l.stats.exchanges.Add(1)
	l.viewMu.Lock()
	l.view.lastExchange, l.view.cipher = time.Now(), s.suite.String()
	l.viewMu.Unlock()
	l.errOpen, l.errProbes, l.errProbeAt = 0, 0, time.Time{}
	l.retry, l.peerLost = min(firstRetry, l.opt().tokxc), false
	l.lastReceived.Store(l.since(time.Now()))
	role := "responder"
	if s.initiator {
		role = "initiator"
	}
	l.log.Debugf("new session %08x/%08x (%v, we were %s)", s.localIndex, s.remoteIndex, s.suite, role)
	if !l.state.up {
		l.linkUp(info)
		l.startPath()
	} else {
		l.prober.grow(time.Now()) // a rekey: has the path grown?
	}
}

func (l *linkLife) handleEvent(ev tunnelEvent) {
	switch ev.kind {
	case eventConfirmed:
		info := l.answered[ev.session]
		delete(l.answered, ev.session)
		if ev.session == l.keys.current.Load() { // not dropped meanwhile (a goodbye, an expiry)
			l.sessionEstablished(ev.session, info)
		}
	case eventPeerMoved:
		if l.kx == nil {
			l.setPeer(ev.from) // nokey: the first sender, for good
			if !l.state.up {
				l.linkUp(exchangePayload{})
			}
			break
		}
		// The inbound loop moved the peer already (its replies must follow at once).
		if ev.old.IsValid() {
			l.log.Printf("peer moved from %s to %s", ev.old, ev.from)
		} else {
			l.log.Printf("peer is %s", ev.from)
		}
		if l.state.up {
			l.startPath() // another path, maybe
		}
	case eventPingRequest:
		l.sendKeepalive(l.keys.current.Load(), 0)
	case eventProbe:
		l.ackProbe(ev.size)
	case eventProbeAck:
		l.prober.ack(time.Now(), ev.size)
	case eventCarrierNews:
		l.checkCarrier(time.Now())
	case eventGoodbye:
		// Under any session we hold: the peer may say it under the one it sends with,
		// which for us may still be unconfirmed, or already previous.
		if s := ev.session; s == l.keys.current.Load() || s == l.keys.previous.Load() || s == l.keys.next.Load() {
			if l.keys.goodbye(s) {
				l.linkDown("the peer shut down")
			}
		}
	case eventUnknownSession:
		l.unknownPending.Store(false)
		// Only a peer that does not know where to send initiations answers so: one that
		// does initiates on its own. At most one datagram, no larger than the one that
		// called it forth, and at most unknownSessionRate a second.
		if l.peer.Load() == nil && l.keys.current.Load() == nil && l.keys.next.Load() == nil {
			if ok, _ := l.unknownLimit.allow(time.Now()); ok {
				l.log.Debugf("telling %s we hold no session for its data", ev.from)
				l.sendControl(l.kx.unknownSession(ev.index, ev.counter), ev.from)
			}
		}
	}
}

// learnable judges a tunnel address the peer claims while ours to learn (no ptpaddr, or
// a ptpaddr range): it must be an address the peer can own, not one of this host's or
// of the carrier, and within the range if one is given.
func (l *linkLife) learnable(a netip.Addr) error {
	switch {
	case a.IsUnspecified():
		return errors.New("it is unspecified")
	case a.IsLoopback():
		return errors.New("it is a loopback address")
	case a.IsMulticast():
		return errors.New("it is a multicast address")
	case a == netip.AddrFrom4([4]byte{255, 255, 255, 255}):
		return errors.New("it is the broadcast address")
	case a.IsLinkLocalUnicast() && !l.cfg.ptpRange.IsValid():
		return errors.New("it is a link-local address (a ptpaddr range that holds it allows it)")
	case a == l.exchangeFrom.Addr() || (l.peer.Load() != nil && a == l.peer.Load().Addr()):
		return errors.New("it is the peer's carrier address")
	case l.cfg.ptpRange.IsValid() && !l.cfg.ptpRange.Contains(a):
		return fmt.Errorf("it is outside ptpaddr's range %s", l.cfg.ptpRange)
	}
	if local, err := isLocalAddress(a); err != nil {
		return fmt.Errorf("cannot tell whether it is an address of this host: %w", err)
	} else if local {
		return errors.New("it is an address of this host")
	}
	return nil
}

// isLocalAddress reports whether an interface of this host (in this network namespace)
// has the address.
func isLocalAddress(a netip.Addr) (bool, error) {
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return false, err
	}
	for _, ia := range addrs {
		if n, ok := ia.(*net.IPNet); ok {
			if la, ok := netip.AddrFromSlice(n.IP); ok && la.Unmap() == a {
				return true, nil
			}
		}
	}
	return false, nil
}

// scriptArgs are CIPE's arguments for ip-up and ip-down (see scriptCall).
func (l *linkLife) scriptArgs(ptp netip.Addr) [6]string {
	local := l.conn.LocalAddr()
	if p := l.peer.Load(); p != nil && local.Addr().IsUnspecified() {
		local = netip.AddrPortFrom(sourceAddressFor(p.Addr(), local.Addr()), local.Port())
	}
	ptpText := ""
	if ptp.IsValid() {
		ptpText = ptp.String()
	}
	return [6]string{l.ifname, local.String(), strconv.Itoa(os.Getpid()), l.cfg.ipaddr.String(), ptpText, l.opt().arg}
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

func (l *linkLife) linkUp(info exchangePayload) {
	ptp := l.cfg.ptpaddr
	if !ptp.IsValid() && info.addr.IsValid() {
		ptp = info.addr
		l.peerTunnelAddr.Store(&ptp)
		if l.kx != nil {
			// Learned for good: every later exchange must claim it (and we expect it).
			l.kx.cfg.expected, l.kx.cfg.learned = ptp, true
		}
		if l.ifindex != 0 && ptp != l.state.configuredPtp {
			if err := l.setInterfacePeer(ptp); err != nil {
				l.log.Printf("cannot set the learned peer address %s on the interface: %v", ptp, err)
			} else {
				l.log.Printf("learned the peer's tunnel address %s", ptp)
			}
		}
	}
	if info.mtu != 0 && int(info.mtu) != l.cfg.mtu {
		l.log.Printf("warning: the peer's mtu is %d, ours is %d; packets larger than the smaller one are lost", info.mtu, l.cfg.mtu)
	}
	l.wasUp.Store(true)
	l.state = linkState{up: true, since: time.Now(), args: l.scriptArgs(ptp), configuredPtp: l.state.configuredPtp, peerInfo: info}
	l.up.Store(true)
	peer := "unknown"
	if p := l.peer.Load(); p != nil {
		peer = p.String()
	}
	cipher := "none (nokey)"
	if cur := l.keys.current.Load(); cur != nil {
		cipher = cur.suite.String()
	}
	l.state.env = []string{"CIPED_PEER=" + peer, "CIPED_CIPHER=" + cipher, "CIPED_MTU=" + strconv.Itoa(l.cfg.mtu),
		"CIPED_NETNS=" + strconv.FormatUint(netnsID(), 10)}
	l.log.Printf("link up: peer %s, cipher %s", peer, cipher)
	l.viewMu.Lock()
	l.view.up, l.view.since, l.view.cipher, l.view.ptp = true, l.state.since, cipher, l.state.args[4]
	l.viewMu.Unlock()
	l.linkChanged(fmt.Sprintf("link up, peer %s, cipher %s", peer, cipher))
	l.scripts.up(scriptCall{name: "ip-up", path: l.opt().ipup, args: l.state.args, env: l.state.env})
}

func (l *linkLife) linkDown(reason string) {
	if !l.state.up {
		return
	}
	l.state.up = false
	l.up.Store(false)
	l.prober.abort()
	if l.kx != nil && l.cfg.dynamicPeer() {
		l.peer.Store(nil) // an address that has not proven itself lately earns nothing
	}
	l.log.Printf("link down: %s", reason)
	l.viewMu.Lock()
	l.view.up, l.view.since, l.view.cipher = false, time.Now(), ""
	l.viewMu.Unlock()
	l.linkChanged("link down: " + reason)
	l.scripts.down([]string{"CIPED_REASON=" + reason}, l.opt().ipdown)
}

// linkChanged tells the hook, if any, of a change of the link.
func (l *linkLife) linkChanged(status string) {
	if l.onLinkChange != nil {
		l.onLinkChange(status)
	}
}

// logStatus writes the link's status to the log (on SIGUSR1).
func (l *linkLife) logStatus() {
	var b strings.Builder
	formatStatus(&b, l.report(), netnsID())
	for _, line := range strings.Split(strings.TrimSpace(b.String()), "\n") {
		l.log.Printf("status: %s", strings.TrimSpace(line))
	}
}

// setInterfacePeer replaces the interface address with one that names ptp as its peer.
func (l *linkLife) setInterfacePeer(ptp netip.Addr) error {
	if err := deleteAddress(l.ifindex, l.cfg.ipaddr, l.state.configuredPtp); err != nil {
		return err
	}
	if err := addAddress(l.ifindex, l.cfg.ipaddr, ptp, l.cfg.metric); err != nil {
		return err
	}
	l.state.configuredPtp = ptp
	if l.routes != nil {
		// The route to the peer's address is new: let its packets in from the first.
		if err := l.routes.refresh(); err != nil {
			l.log.Printf("rpfilter: %v", err)
		}
	}
	return nil
}

// shutdown tells the peer, takes the link down and forgets the keys.
func (l *linkLife) shutdown() {
	if l.kx != nil {
		l.sendKeepalive(l.keys.current.Load(), flagGoodbye)
	}
	l.linkDown("shutting down")
	l.keys.clear()
}
