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
	LastExchange  time.Time      `json:"last_key_exchange,omitzero"`
	KeyExchanges  uint64         `json:"key_exchanges"`
	Sent          trafficCounts  `json:"sent"`
	Received      trafficCounts  `json:"received"`
	Dropped       droppedCounts  `json:"dropped"`
	Errors        errorCounts    `json:"errors"`
	Time          time.Time      `json:"time"`
	Options       statusSettings `json:"options"`
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
	fmt.Fprintf(w, "  cipher %s; last key exchange %s; %d key exchanges\n", cipher, ago(r.LastExchange, r.Time), r.KeyExchanges)
	fmt.Fprintf(w, "  sent %d packets (%s), received %d packets (%s)\n", r.Sent.Packets, humanBytes(r.Sent.Bytes),
		r.Received.Packets, humanBytes(r.Received.Bytes))
	d := r.Dropped
	fmt.Fprintf(w, "  dropped: %d failed authentication, %d replayed, %d malformed, %d for unknown session, "+
		"%d without session, %d too big, %d with a source not routed here, %d key-exchange refused\n", d.Auth, d.Replay,
		d.Malformed, d.UnknownSession, d.NoSession, d.TooBig, d.Source, d.KeyExchange)
	fmt.Fprintf(w, "  errors: %d carrier, %d interface; %d ICMP reports about others ignored\n", r.Errors.Carrier,
		r.Errors.Interface, r.Errors.ForeignICMP)
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
