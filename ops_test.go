package main

// Operations end to end: reload (SIGHUP), hitless rotation of the link key, health exit
// codes and metrics of `ciped status`.

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// rewrite replaces the content of an options file (mode 0600) in place.
func rewrite(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
}

// hup sends SIGHUP and waits for the reload's log line (the n-th one) matching re.
func hup(t *testing.T, d *daemon, re string, n int) {
	t.Helper()
	if err := d.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	d.waitLog(t, fmt.Sprintf(`(?s)(reload.*){%d}`, n), linkBound)
	d.waitLog(t, re, linkBound)
}

// keepalivesFrom counts the keepalives (empty data messages, 32 bytes) src sent.
func keepalivesFrom(frames [][]byte, src string) int {
	n := 0
	for _, p := range udpPackets(frames) {
		if p.src.Addr().String() == src && len(p.payload) == dataOverhead && p.payload[offsetType] == messageData {
			n++
		}
	}
	return n
}

// TestE2EReload: SIGHUP reads the options again and applies them to the running link. A
// reload that turns on ping is seen on the wire (keepalives from then on), while pings
// through the tunnel lose nothing and no script runs; a file that fails its checks and a
// change that cannot be made live (device) change nothing and say why.
func TestE2EReload(t *testing.T) {
	requireRoot(t)
	l := &e2eLink{dir: t.TempDir(), ns: newNetnsPair(t, false)}
	optionsA := writeFile(t, l.dir, "optionsA", "key "+testKey+"\ndevice cipcb0\n", 0o600)
	l.a = startDaemon(t, "ciped A", l.ns.a, append([]string{"-o", optionsA, "me=198.18.0.1:6000",
		"peer=198.18.0.2:6000", "ipaddr=" + e2eTunnelA, "ptpaddr=" + e2eTunnelB, "debug"}, scriptRecorder(t, l.dir)...)...)
	l.b = startDaemon(t, "ciped B", l.ns.b, "-o", keyFile(t, l.dir, "optionsB", testKey), "me=198.18.0.2:6000",
		"peer=198.18.0.1:6000", "ipaddr="+e2eTunnelB, "ptpaddr="+e2eTunnelA, "device=cipcb0", "debug")
	l.waitUp(t)

	stop := make(chan struct{})
	frames := capture(t, l.ns.b, "ve1", stop)
	time.Sleep(3 * time.Second) // idle, no ping: no keepalives
	close(stop)
	if n := keepalivesFrom(<-frames, l.ns.carrierA.String()); n != 0 {
		t.Fatalf("a sent %d keepalives without ping", n)
	}

	pinging := make(chan int, 1)
	go func() { pinging <- ping(t, l.ns.b, e2eTunnelA, 300, "0.01") }()
	rewrite(t, optionsA, "key "+testKey+"\ndevice cipcb0\nping 1\ntoping 5\n")
	hup(t, l.a, `reloaded in [^:]+: ping, toping changed`, 1)
	if got := <-pinging; got != 300 {
		t.Errorf("%d of 300 pings across the reload", got)
	}
	stop = make(chan struct{})
	frames = capture(t, l.ns.b, "ve1", stop)
	time.Sleep(3500 * time.Millisecond)
	close(stop)
	if n := keepalivesFrom(<-frames, l.ns.carrierA.String()); n < 2 {
		t.Fatalf("a sent %d keepalives in 3.5 s after ping 1 was reloaded", n)
	}
	out, _ := cipedStatus(t, "--json", "cipcb0")
	if !strings.Contains(out, `"ping": "1s"`) || !strings.Contains(out, `"toping": "5s"`) {
		t.Errorf("status after the reload:\n%s", out)
	}

	// A file that fails its checks: nothing changes, and the log says why as start does.
	rewrite(t, optionsA, "key "+testKey+"\ndevice cipcb0\nping 1\nmtu x1\n")
	hup(t, l.a, `reload: .*optionsA:4: mtu: "x1" is not a whole number; nothing was changed`, 2)
	// An option that cannot change on a running link: refused by name.
	rewrite(t, optionsA, "key "+testKey+"\nping 2\ntoping 5\ndevice other0\nmtu 1400\n")
	hup(t, l.a, `reload refused: mtu, device cannot change on a running link \(restart ciped for that\); nothing was changed`, 3)
	if out, _ := cipedStatus(t, "--json", "cipcb0"); !strings.Contains(out, `"ping": "1s"`) {
		t.Errorf("a refused reload changed the settings:\n%s", out)
	}
	if got := ping(t, l.ns.a, e2eTunnelB, 3, "0.2"); got != 3 {
		t.Fatalf("after the refused reloads: %d of 3 pings", got)
	}
	if calls := readLines(t, filepath.Join(l.dir, "calls")); len(calls) != 1 || !strings.HasPrefix(calls[0], "ip-up") {
		t.Fatalf("scripts ran across the reloads: %q", calls)
	}
	if l.a.count("link down") != 0 || l.b.count("link down") != 0 {
		t.Fatal("a link went down across the reloads")
	}
}

// TestE2EKeyRotation: the link key is rotated while a TCP transfer runs and the ends
// rekey every 2 s: a gets the new key with the old one accepted, then b, then each
// drops the old key, each step a reload. Nothing is lost, neither end runs ip-down, and
// the ends keep agreeing on sessions under the new key.
func TestE2EKeyRotation(t *testing.T) {
	requireRoot(t)
	l := &e2eLink{dir: t.TempDir()}
	l.extraA = append(scriptRecorder(t, l.dir), "tokey=2", "tokxc=1")
	l.extraB = []string{"tokey=2", "tokxc=1"}
	l.start(t, false)
	l.waitUp(t)
	optionsA, optionsB := filepath.Join(l.dir, "optionsA"), filepath.Join(l.dir, "optionsB")
	newKey := strings.Repeat("5a", 16)
	steps := []struct {
		d    *daemon
		file string
		body string
	}{
		{l.a, optionsA, "key " + newKey + "\noldkey " + testKey + "\n"},
		{l.b, optionsB, "key " + newKey + "\noldkey " + testKey + "\n"},
		{l.a, optionsA, "key " + newKey + "\n"},
		{l.b, optionsB, "key " + newKey + "\n"},
	}
	done := make(chan error, 1)
	go func() {
		for _, s := range steps {
			time.Sleep(4 * time.Second) // two rekeys at least between the steps
			if err := os.WriteFile(s.file, []byte(s.body), 0o600); err != nil {
				done <- err
				return
			}
			s.d.cmd.Process.Signal(syscall.SIGHUP)
		}
		time.Sleep(4 * time.Second)
		done <- nil
	}()
	// 256 KiB every 60 ms: about 20 s, past the last step.
	sent, got := transfer(t, l.ns.a, l.ns.b, e2eTunnelB, 80<<20, nil, 60*time.Millisecond)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if sent != got {
		t.Fatalf("transfer across the rotation: sent %x, received %x", sent, got)
	}
	for _, d := range []*daemon{l.a, l.b} {
		if n := d.count(`reloaded in [^:]+: (key, oldkey|oldkey) changed`); n != 2 {
			t.Fatalf("%s: %d reloads of the keys, want 2:\n%s", d.name, n, d.log.String())
		}
		if d.count("link down") != 0 {
			t.Fatalf("%s's link went down during the rotation", d.name)
		}
		// Sessions made after its last reload: under the new key alone.
		log := d.log.String()
		if after := log[strings.LastIndex(log, "reloaded"):]; !strings.Contains(after, "new session") {
			t.Fatalf("%s made no session after dropping the old key", d.name)
		}
	}
	if calls := readLines(t, filepath.Join(l.dir, "calls")); len(calls) != 1 {
		t.Fatalf("scripts ran during the rotation: %q", calls)
	}
	if got := ping(t, l.ns.a, e2eTunnelB, 3, "0.2"); got != 3 {
		t.Fatalf("after the rotation: %d of 3 pings", got)
	}
}
