package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// cipedStatus runs `ciped status ARGS` as a user would.
func cipedStatus(t *testing.T, args ...string) (string, int) {
	t.Helper()
	cmd := exec.Command(cipedBinary(t), append([]string{"status"}, args...)...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return out.String(), code
}

// TestE2EStatus: `ciped status` shows every running link, two of them in two namespaces
// with the same interface name among them, without their colliding under /run; --json
// carries the counters; the sockets are root-only and go away with the links; SIGUSR1
// writes the status to the log.
func TestE2EStatus(t *testing.T) {
	requireRoot(t)
	l1, l2 := &e2eLink{}, &e2eLink{}
	l1.start(t, false)
	l2.start(t, false)
	l1.waitUp(t)
	l2.waitUp(t)
	if got := ping(t, l1.ns.a, e2eTunnelB, 3, "0.1"); got != 3 {
		t.Fatalf("ping: %d of 3", got)
	}
	var reports []statusReport
	out, code := cipedStatus(t, "cipcb0", "--json")
	if code != 0 {
		t.Fatalf("status: exit %d\n%s", code, out)
	}
	if err := json.Unmarshal([]byte(out), &reports); err != nil {
		t.Fatalf("status --json: %v\n%s", err, out)
	}
	mine := map[int]statusReport{}
	for _, r := range reports {
		mine[r.PID] = r
	}
	netnses := map[uint64]bool{}
	for _, d := range []*daemon{l1.a, l1.b, l2.a, l2.b} {
		r, ok := mine[d.pid()]
		if !ok {
			t.Fatalf("no status of %s (pid %d) in:\n%s", d.name, d.pid(), out)
		}
		if r.Interface != "cipcb0" || r.Link != "up" || r.Cipher == "" || r.Peer == "" || r.KeyExchanges < 1 {
			t.Errorf("status of %s: %+v", d.name, r)
		}
		netnses[r.Netns] = true
		path := statusSocketPath(statusDir, "cipcb0")
		path = strings.Replace(path, fmt.Sprint(netnsID()), fmt.Sprint(r.Netns), 1)
		info, err := os.Stat(path)
		if err != nil || info.Mode().Perm() != 0o600 || info.Mode()&os.ModeSocket == 0 {
			t.Errorf("status socket %s: %v, %v", path, info.Mode(), err)
		}
	}
	if len(netnses) != 4 {
		t.Errorf("four links in four namespaces reported %d namespaces", len(netnses))
	}
	if r := mine[l1.a.pid()]; r.Sent.Packets < 3 || r.Received.Packets < 3 {
		t.Errorf("a's counters after 3 pings: %+v", r)
	}
	if info, err := os.Stat(statusDir); err != nil || info.Mode().Perm() != 0o700 {
		t.Errorf("%s: %v %v", statusDir, info.Mode(), err)
	}
	out, code = cipedStatus(t)
	if code != 0 || strings.Count(out, "cipcb0 (pid") < 4 || !strings.Contains(out, "link up since") ||
		!strings.Contains(out, "network namespace") {
		t.Errorf("ciped status (exit %d):\n%s", code, out)
	}
	if out, code := cipedStatus(t, "nosuchdev"); code != statusNotRunning || !strings.Contains(out, `no ciped is running on "nosuchdev"`) {
		t.Errorf("status of a device that has no link: exit %d, %q", code, out)
	}

	// A client that connects and does not read, many of them, does not stop others.
	var idle []net.Conn
	for i := 0; i < 50; i++ {
		path := strings.Replace(statusSocketPath(statusDir, "cipcb0"), fmt.Sprint(netnsID()), fmt.Sprint(mine[l1.a.pid()].Netns), 1)
		c, err := net.Dial("unix", path)
		if err != nil {
			t.Fatal(err)
		}
		idle = append(idle, c)
	}
	waitFor(t, "status despite idle clients", linkBound, func() bool {
		out, code := cipedStatus(t, "cipcb0", "--json")
		return code == 0 && strings.Contains(out, fmt.Sprintf(`"pid": %d`, l1.a.pid()))
	})
	for _, c := range idle {
		c.Close()
	}

	// SIGUSR1: the same, in the log.
	if err := l1.a.cmd.Process.Signal(syscall.SIGUSR1); err != nil {
		t.Fatal(err)
	}
	l1.a.waitLog(t, `status: cipcb0 \(pid \d+.*\): link up since`, linkBound)
	l1.a.waitLog(t, `status: sent \d+ packets`, linkBound)

	// Gone with the link.
	path := strings.Replace(statusSocketPath(statusDir, "cipcb0"), fmt.Sprint(netnsID()), fmt.Sprint(mine[l1.a.pid()].Netns), 1)
	l1.a.terminate(t)
	if _, err := os.Stat(path); err == nil {
		t.Errorf("%s outlived its link", path)
	}
}

// TestE2ENotify: under systemd (NOTIFY_SOCKET set), ciped says READY=1 once the interface
// is configured (not before), STATUS= as the link changes, STOPPING=1 at the end.
func TestE2ENotify(t *testing.T) {
	requireRoot(t)
	dir := t.TempDir()
	sock := filepath.Join(dir, "notify")
	ln, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	msgs := make(chan string, 16)
	go func() {
		buf := make([]byte, 4096)
		for {
			n, err := ln.Read(buf)
			if err != nil {
				close(msgs)
				return
			}
			msgs <- string(buf[:n])
		}
	}()
	next := func(want string) string {
		t.Helper()
		select {
		case m := <-msgs:
			if !strings.Contains(m, want) {
				t.Fatalf("notify message %q, want one with %q", m, want)
			}
			return m
		case <-time.After(linkBound):
			t.Fatalf("no notify message with %q", want)
			return ""
		}
	}
	ns := newNetnsPair(t, false)
	a := startDaemonEnv(t, "ciped A", ns.a, []string{"NOTIFY_SOCKET=" + sock}, "-o", keyFile(t, dir, "k", testKey),
		"me=198.18.0.1:6000", "peer=198.18.0.2:6000", "ipaddr="+e2eTunnelA, "ptpaddr="+e2eTunnelB)
	next("READY=1")
	if addrs := mustRun(t, "ip", "-n", ns.a, "addr", "show", "dev", "cipcb0"); !strings.Contains(addrs, e2eTunnelA+" peer "+e2eTunnelB) ||
		!strings.Contains(addrs, ",UP") {
		t.Fatalf("READY=1 before the interface was configured:\n%s", addrs)
	}
	startDaemon(t, "ciped B", ns.b, "-o", keyFile(t, dir, "k2", testKey), "me=198.18.0.2:6000",
		"peer=198.18.0.1:6000", "ipaddr="+e2eTunnelB, "ptpaddr="+e2eTunnelA)
	next("STATUS=link up, peer 198.18.0.2:6000")
	// A reload: RELOADING=1 with the monotonic clock, as the protocol asks, then READY=1.
	if err := a.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	if m := next("RELOADING=1"); !regexp.MustCompile(`\nMONOTONIC_USEC=\d+$`).MatchString(m) {
		t.Fatalf("reloading message %q", m)
	}
	next("READY=1")
	a.terminate(t)
	next("STOPPING=1")
}

// TestNotifyMessage: one datagram to $NOTIFY_SOCKET, also an abstract one (@name); none
// without the variable.
func TestNotifyMessage(t *testing.T) {
	for _, name := range []string{filepath.Join(t.TempDir(), "n"), fmt.Sprintf("@ciped-test-%d", os.Getpid())} {
		ln, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: name, Net: "unixgram"})
		if err != nil {
			t.Fatal(err)
		}
		t.Setenv("NOTIFY_SOCKET", name)
		if err := sdNotify("READY=1\nSTATUS=x"); err != nil {
			t.Fatal(err)
		}
		ln.SetReadDeadline(time.Now().Add(10 * time.Second))
		buf := make([]byte, 100)
		n, err := ln.Read(buf)
		if err != nil || string(buf[:n]) != "READY=1\nSTATUS=x" {
			t.Fatalf("%s: got %q, %v", name, buf[:n], err)
		}
		ln.Close()
	}
	t.Setenv("NOTIFY_SOCKET", "")
	if err := sdNotify("READY=1"); err != nil {
		t.Fatalf("without NOTIFY_SOCKET: %v", err)
	}
}

// TestE2EStatusHealth: `ciped status DEVICE` exits 0 while the link is up, 1 when it is
// down, 3 when no ciped runs on it, 4 for a caller who may not ask; the report tells how
// long ago the peer was heard from and the last exchange was, the rates each way and the
// path MTU; --metrics is the Prometheus text format a real parser reads, with every link.
func TestE2EStatusHealth(t *testing.T) {
	requireRoot(t)
	l := &e2eLink{devA: "cphlt0", devB: "cphlt1"}
	l.start(t, false)
	l.waitUp(t)
	transfer(t, l.ns.a, l.ns.b, e2eTunnelB, 4<<20, nil, 0)
	out, code := cipedStatus(t, "cphlt0", "--json")
	var reports []statusReport
	if err := json.Unmarshal([]byte(out), &reports); code != statusUp || err != nil || len(reports) != 1 {
		t.Fatalf("status of an up link: exit %d, %v\n%s", code, err, out)
	}
	r := reports[0]
	if r.LastReceived.IsZero() || r.Time.Sub(r.LastReceived) > 10*time.Second || r.LastExchange.IsZero() ||
		r.Rates.Sent <= 0 || r.PathMTU != 1500 || r.Cipher == "" {
		t.Fatalf("status of an up link: %+v", r)
	}
	if text, _ := cipedStatus(t, "cphlt0"); !strings.Contains(text, "last heard from the peer") || !strings.Contains(text, "/s out") {
		t.Fatalf("status text:\n%s", text)
	}

	// Metrics, read by Prometheus's own parser.
	out, code = cipedStatus(t, "--metrics")
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(strings.NewReader(out))
	if code != statusUp || err != nil {
		t.Fatalf("--metrics: exit %d, %v\n%s", code, err, out)
	}
	for _, name := range []string{"ciped_link_up", "ciped_sent_bytes_total", "ciped_received_packets_total",
		"ciped_dropped_packets_total", "ciped_key_exchanges_total", "ciped_carrier_errors_total",
		"ciped_last_received_seconds", "ciped_last_key_exchange_seconds", "ciped_path_mtu_bytes"} {
		if families[name] == nil {
			t.Errorf("no %s in:\n%s", name, out)
		}
	}
	devices := map[string]float64{}
	for _, m := range families["ciped_link_up"].GetMetric() {
		for _, lp := range m.GetLabel() {
			if lp.GetName() == "device" {
				devices[lp.GetValue()] = m.GetGauge().GetValue()
			}
		}
	}
	if devices["cphlt0"] != 1 || devices["cphlt1"] != 1 {
		t.Fatalf("ciped_link_up by device: %v", devices)
	}
	if reasons := len(families["ciped_dropped_packets_total"].GetMetric()); reasons != 2*8 {
		t.Fatalf("%d dropped-packet series for two links", reasons)
	}

	// The peer goes away: the link is down, and says so.
	l.b.terminate(t)
	l.a.waitLog(t, "link down", linkBound)
	out, code = cipedStatus(t, "cphlt0", "--json")
	reports = nil
	json.Unmarshal([]byte(out), &reports)
	if code != statusDown || len(reports) != 1 || reports[0].Link != "down" || reports[0].Cipher != "" {
		t.Fatalf("status of a down link: exit %d\n%s", code, out)
	}
	// A caller who is not root is told so (with a copy of ciped it may run).
	open, err := os.MkdirTemp("", "ciped-nobody-") // not under t.TempDir(), whose parent is root's alone
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(open)
	os.Chmod(open, 0o755)
	bin, err := os.ReadFile(cipedBinary(t))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(open, "ciped"), bin, 0o755); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(filepath.Join(open, "ciped"), "status", "cphlt0")
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	text, err := cmd.CombinedOutput()
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != statusNoAccess || !strings.Contains(string(text), "needs root") {
		t.Fatalf("status as nobody: %v\n%s", err, text)
	}
	l.a.terminate(t)
	if out, code := cipedStatus(t, "cphlt0"); code != statusNotRunning {
		t.Fatalf("status with no ciped: exit %d\n%s", code, out)
	}
}
