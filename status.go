package main

// Status: the report a running link gives of itself (link.go fills it), and the ways it
// is published: a unix socket under /run/cipe (for `ciped status`), the text written for
// people (and to the log on SIGUSR1), and systemd's notify protocol.

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
)

const (
	statusDir         = "/run/cipe" // root-only directory of the status sockets
	statusWriteLimit  = time.Second // a client that does not take its report by then is dropped
	statusConcurrency = 4           // clients served at once; more are turned away
)

// statusReport is a snapshot of one link. It holds no key material.
type statusReport struct {
	Interface     string         `json:"interface"`
	PID           int            `json:"pid"`
	Netns         uint64         `json:"netns"`
	Version       string         `json:"version"`
	Link          string         `json:"link"` // "up" or "down"
	Since         time.Time      `json:"since,omitzero"`
	Peer          string         `json:"peer"`
	Local         string         `json:"local"`
	TunnelAddress string         `json:"ipaddr"`
	PeerAddress   string         `json:"ptpaddr"`
	MTU           int            `json:"mtu"`
	Cipher        string         `json:"cipher"`
	PathMTU       int            `json:"path_mtu"` // the largest carrier packet the path takes, as probed
	LastExchange  time.Time      `json:"last_key_exchange,omitzero"`
	LastReceived  time.Time      `json:"last_received,omitzero"` // the last authentic datagram from the peer
	KeyExchanges  uint64         `json:"key_exchanges"`
	Rates         rates          `json:"rates"`
	Sent          trafficCounts  `json:"sent"`
	Received      trafficCounts  `json:"received"`
	Dropped       droppedCounts  `json:"dropped"`
	Errors        errorCounts    `json:"errors"`
	Time          time.Time      `json:"time"`
	Options       statusSettings `json:"options"`
}

// rates are the bytes per second through the tunnel each way, over the last 10 seconds
// or so.
type rates struct {
	Sent     float64 `json:"sent_bytes_per_second"`
	Received float64 `json:"received_bytes_per_second"`
}

type trafficCounts struct {
	Packets uint64 `json:"packets"`
	Bytes   uint64 `json:"bytes"`
}

type droppedCounts struct {
	Auth           uint64 `json:"auth"`
	Replay         uint64 `json:"replay"`
	Malformed      uint64 `json:"malformed"`
	UnknownSession uint64 `json:"unknown_session"`
	NoSession      uint64 `json:"no_session"`
	TooBig         uint64 `json:"too_big"`
	Source         uint64 `json:"source"`
	KeyExchange    uint64 `json:"key_exchange"`
}

type errorCounts struct {
	Carrier     uint64 `json:"carrier"`
	ForeignICMP uint64 `json:"foreign_icmp"` // ICMP reports about datagrams we did not send to the peer (ignored)
	Interface   uint64 `json:"interface"`
}

type statusSettings struct {
	Tokey  string `json:"tokey"`
	Tokxc  string `json:"tokxc"`
	Ping   string `json:"ping"`
	Toping string `json:"toping"`
	Maxerr int    `json:"maxerr"`
}

// netnsID is the inode of this process's network namespace: two links with one interface
// name in two namespaces are told apart by it.
func netnsID() uint64 {
	var st syscall.Stat_t
	if syscall.Stat("/proc/self/ns/net", &st) != nil {
		return 0
	}
	return st.Ino
}

// statusSocketPath is where the link of this interface in this network namespace serves
// its status.
func statusSocketPath(dir, ifname string) string {
	return filepath.Join(dir, fmt.Sprintf("%s-%d.sock", ifname, netnsID()))
}

// statusServer serves the link's status on a unix socket: one JSON report per
// connection, without reading anything from the client.
type statusServer struct {
	ln   *net.UnixListener
	path string
	slot chan struct{}
}

// listenStatus creates dir (root only) and the socket (mode 0600) for the link of
// interface ifname, which report describes (it is called from other goroutines). A
// socket file left by a link that died is replaced.
func listenStatus(dir, ifname string, report func() statusReport) (*statusServer, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	if err := os.Chmod(dir, 0o700); err != nil {
		return nil, err
	}
	path := statusSocketPath(dir, ifname)
	if c, err := net.Dial("unix", path); err == nil {
		c.Close()
		return nil, fmt.Errorf("%s is in use by another ciped", path)
	}
	os.Remove(path)
	old := syscall.Umask(0o177)
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	syscall.Umask(old)
	if err != nil {
		return nil, err
	}
	ln.SetUnlinkOnClose(true)
	s := &statusServer{ln: ln, path: path, slot: make(chan struct{}, statusConcurrency)}
	go s.routineServe(report)
	return s, nil
}

func (s *statusServer) routineServe(report func() statusReport) {
	for {
		c, err := s.ln.AcceptUnix()
		if err != nil {
			return
		}
		select {
		case s.slot <- struct{}{}:
			go func() {
				defer func() { <-s.slot }()
				defer c.Close()
				c.SetWriteDeadline(time.Now().Add(statusWriteLimit))
				b, _ := json.Marshal(report())
				c.Write(append(b, '\n'))
			}()
		default:
			c.Close() // too many at once: a slow or hostile client must not pile them up
		}
	}
}

func (s *statusServer) close() { s.ln.Close() }

// readStatus asks every link serving under dir (those of interface device, if given).
// Sockets nobody answers on (left by a link that died) are skipped.
func readStatus(dir, device string) ([]statusReport, error) {
	paths, err := filepath.Glob(filepath.Join(dir, "*.sock"))
	if err != nil {
		return nil, err
	}
	var reports []statusReport
	for _, p := range paths {
		name := strings.TrimSuffix(filepath.Base(p), ".sock")
		if i := strings.LastIndex(name, "-"); device != "" && (i < 0 || name[:i] != device) {
			continue
		}
		c, err := net.DialTimeout("unix", p, time.Second)
		if err != nil {
			continue
		}
		c.SetDeadline(time.Now().Add(5 * time.Second))
		b, err := io.ReadAll(io.LimitReader(c, 1<<20))
		c.Close()
		var r statusReport
		if err != nil || json.Unmarshal(b, &r) != nil {
			continue
		}
		reports = append(reports, r)
	}
	sort.Slice(reports, func(i, j int) bool {
		if reports[i].Interface != reports[j].Interface {
			return reports[i].Interface < reports[j].Interface
		}
		return reports[i].PID < reports[j].PID
	})
	return reports, nil
}

// humanBytes writes a byte count the way people read them.
func humanBytes(n uint64) string {
	switch {
	case n >= 1e12:
		return fmt.Sprintf("%.1f TB", float64(n)/1e12)
	case n >= 1e9:
		return fmt.Sprintf("%.1f GB", float64(n)/1e9)
	case n >= 1e6:
		return fmt.Sprintf("%.1f MB", float64(n)/1e6)
	case n >= 1e3:
		return fmt.Sprintf("%.1f kB", float64(n)/1e3)
	}
	return fmt.Sprintf("%d B", n)
}

func ago(t, now time.Time) string {
	if t.IsZero() {
		return "never"
	}
	return now.Sub(t).Round(time.Second).String() + " ago"
}

// formatStatus writes a report for people, in a few lines.
func formatStatus(w io.Writer, r statusReport, here uint64) {
	where := ""
	if r.Netns != here {
		where = fmt.Sprintf(", network namespace %d", r.Netns)
	}
	state := "down"
	if r.Link == "up" {
		state = fmt.Sprintf("up since %s (%s)", r.Since.Local().Format("2006-01-02 15:04:05"), r.Time.Sub(r.Since).Round(time.Second))
	} else if !r.Since.IsZero() {
		state = fmt.Sprintf("down since %s", r.Since.Local().Format("2006-01-02 15:04:05"))
	}
	peer := r.Peer
	if peer == "" {
		peer = "not known yet"
	}
	ptp := r.PeerAddress
	if ptp == "" {
		ptp = "(learned from the peer)"
	}
	cipher := r.Cipher
	if cipher == "" {
		cipher = "none yet"
	}
	fmt.Fprintf(w, "%s (pid %d%s): link %s\n", r.Interface, r.PID, where, state)
	fmt.Fprintf(w, "  peer %s, local %s; tunnel %s peer %s, mtu %d\n", peer, r.Local, r.TunnelAddress, ptp, r.MTU)
	fmt.Fprintf(w, "  cipher %s; last key exchange %s; %d key exchanges; last heard from the peer %s\n", cipher,
		ago(r.LastExchange, r.Time), r.KeyExchanges, ago(r.LastReceived, r.Time))
	fmt.Fprintf(w, "  sent %d packets (%s), received %d packets (%s); now %s/s out, %s/s in; path MTU %d\n",
		r.Sent.Packets, humanBytes(r.Sent.Bytes), r.Received.Packets, humanBytes(r.Received.Bytes),
		humanBytes(uint64(r.Rates.Sent)), humanBytes(uint64(r.Rates.Received)), r.PathMTU)
	d := r.Dropped
	fmt.Fprintf(w, "  dropped: %d failed authentication, %d replayed, %d malformed, %d for unknown session, "+
		"%d without session, %d too big, %d with a source not routed here, %d key-exchange refused\n", d.Auth, d.Replay,
		d.Malformed, d.UnknownSession, d.NoSession, d.TooBig, d.Source, d.KeyExchange)
	fmt.Fprintf(w, "  errors: %d carrier, %d interface; %d ICMP reports about others ignored\n", r.Errors.Carrier,
		r.Errors.Interface, r.Errors.ForeignICMP)
}

// Exit statuses of `ciped status` (LSB's for status actions where they fit).
const (
	statusUp         = 0 // every link shown is up
	statusDown       = 1 // a link shown is down (its ciped runs)
	statusNotRunning = 3 // no ciped runs (on that device)
	statusNoAccess   = 4 // the caller may not ask (not root)
)

// statusExit is the exit status for the links found.
func statusExit(reports []statusReport) int {
	if len(reports) == 0 {
		return statusNotRunning
	}
	for _, r := range reports {
		if r.Link != "up" {
			return statusDown
		}
	}
	return statusUp
}

// writeMetrics writes the reports in the Prometheus text exposition format (version
// 0.0.4, which OpenMetrics parsers take too): one family per quantity, a sample per link,
// labelled by device, peer and network namespace.
func writeMetrics(w io.Writer, reports []statusReport) {
	type sample struct {
		extra string // more labels, e.g. `,reason="auth"`
		value float64
	}
	family := func(name, typ, help string, value func(r *statusReport) []sample) {
		fmt.Fprintf(w, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, typ)
		for i := range reports {
			r := &reports[i]
			labels := fmt.Sprintf(`device="%s",peer="%s",netns="%d"`, escapeLabel(r.Interface), escapeLabel(r.Peer), r.Netns)
			for _, s := range value(r) {
				fmt.Fprintf(w, "%s{%s%s} %s\n", name, labels, s.extra, strconv.FormatFloat(s.value, 'g', -1, 64))
			}
		}
	}
	one := func(v float64) []sample { return []sample{{value: v}} }
	age := func(t, now time.Time) []sample {
		if t.IsZero() {
			return nil
		}
		return one(now.Sub(t).Seconds())
	}
	family("ciped_link_up", "gauge", "Whether the link is up (1) or down (0).", func(r *statusReport) []sample {
		return one(map[bool]float64{true: 1}[r.Link == "up"])
	})
	family("ciped_link_info", "gauge", "Facts about the link, as labels; the value is 1.", func(r *statusReport) []sample {
		return []sample{{extra: fmt.Sprintf(`,version="%s",cipher="%s",ipaddr="%s",ptpaddr="%s"`, escapeLabel(r.Version),
			escapeLabel(r.Cipher), escapeLabel(r.TunnelAddress), escapeLabel(r.PeerAddress)), value: 1}}
	})
	family("ciped_sent_packets_total", "counter", "Inner packets sent through the tunnel.",
		func(r *statusReport) []sample { return one(float64(r.Sent.Packets)) })
	family("ciped_sent_bytes_total", "counter", "Inner bytes sent through the tunnel.",
		func(r *statusReport) []sample { return one(float64(r.Sent.Bytes)) })
	family("ciped_received_packets_total", "counter", "Inner packets received through the tunnel.",
		func(r *statusReport) []sample { return one(float64(r.Received.Packets)) })
	family("ciped_received_bytes_total", "counter", "Inner bytes received through the tunnel.",
		func(r *statusReport) []sample { return one(float64(r.Received.Bytes)) })
	family("ciped_dropped_packets_total", "counter", "Packets and messages dropped, by reason.", func(r *statusReport) []sample {
		d := r.Dropped
		var out []sample
		for _, c := range []struct {
			reason string
			n      uint64
		}{{"auth", d.Auth}, {"replay", d.Replay}, {"malformed", d.Malformed}, {"unknown_session", d.UnknownSession},
			{"no_session", d.NoSession}, {"too_big", d.TooBig}, {"source", d.Source}, {"key_exchange", d.KeyExchange}} {
			out = append(out, sample{extra: `,reason="` + c.reason + `"`, value: float64(c.n)})
		}
		return out
	})
	family("ciped_key_exchanges_total", "counter", "Completed key exchanges.",
		func(r *statusReport) []sample { return one(float64(r.KeyExchanges)) })
	family("ciped_carrier_errors_total", "counter", "Failed carrier sends and receives, and ICMP errors about datagrams to the peer.",
		func(r *statusReport) []sample { return one(float64(r.Errors.Carrier)) })
	family("ciped_foreign_icmp_total", "counter", "ICMP reports about datagrams not sent to the peer, ignored.",
		func(r *statusReport) []sample { return one(float64(r.Errors.ForeignICMP)) })
	family("ciped_interface_errors_total", "counter", "Failed reads and writes of the tunnel interface.",
		func(r *statusReport) []sample { return one(float64(r.Errors.Interface)) })
	family("ciped_last_received_seconds", "gauge", "Seconds since the last authentic datagram from the peer.",
		func(r *statusReport) []sample { return age(r.LastReceived, r.Time) })
	family("ciped_last_key_exchange_seconds", "gauge", "Seconds since the last completed key exchange.",
		func(r *statusReport) []sample { return age(r.LastExchange, r.Time) })
	family("ciped_path_mtu_bytes", "gauge", "The largest carrier packet the path to the peer takes, as probed.",
		func(r *statusReport) []sample { return one(float64(r.PathMTU)) })
}

// escapeLabel escapes a label value of the text exposition format.
func escapeLabel(s string) string {
	return strings.NewReplacer(`\`, `\\`, "\n", `\n`, `"`, `\"`).Replace(s)
}

// sdNotify sends a state to systemd's notify socket ($NOTIFY_SOCKET), if there is one:
// one datagram, as sd_notify(3) does. "@" names an abstract socket.
func sdNotify(state string) error {
	path := os.Getenv("NOTIFY_SOCKET")
	if path == "" {
		return nil
	}
	c, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		return err
	}
	defer c.Close()
	_, err = c.Write([]byte(state))
	return err
}
