package main

// Helpers for end-to-end tests: network namespaces joined by a veth pair, ciped
// processes started inside them, and sockets opened inside them from the test process.
//
// Network safety: everything happens inside namespaces the test creates and removes.
// Carrier (veth) addresses are from 198.18.0.0/15 (and 2001:db8::/32, the IPv6
// documentation prefix); tunnel addresses from 10.0.0.0/8 inside the namespaces.

import (
	"bytes"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// requireRoot skips an end-to-end test that cannot run here, with the reason; in CI
// (CI=true) it fails instead, since there these tests must run.
func requireRoot(t *testing.T) {
	t.Helper()
	reason := ""
	switch {
	case os.Geteuid() != 0:
		reason = "end-to-end test needs root (network namespaces, TUN devices)"
	case func() bool { _, err := os.Stat("/dev/net/tun"); return err != nil }():
		reason = "end-to-end test needs /dev/net/tun"
	case func() bool { _, err := exec.LookPath("ip"); return err != nil }():
		reason = "end-to-end test needs ip (iproute2)"
	}
	if reason == "" {
		return
	}
	if os.Getenv("CI") == "true" {
		t.Fatalf("%s, and in CI it must not be skipped", reason)
	}
	t.Skip(reason + "; skipped")
}

var (
	buildOnce   sync.Once
	builtBinary string
	buildErr    error
	nsCounter   atomic.Int32
)

// cipedBinary builds ciped once per test run (with the race detector when the tests
// have it) and returns its path. CIPED_TEST_BINARY names another binary to run instead
// (to see which end-to-end tests an older ciped fails).
func cipedBinary(t *testing.T) string {
	t.Helper()
	if bin := os.Getenv("CIPED_TEST_BINARY"); bin != "" {
		return bin
	}
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "ciped-e2e-")
		if err != nil {
			buildErr = err
			return
		}
		builtBinary = filepath.Join(dir, "ciped")
		args := []string{"build", "-o", builtBinary}
		if raceEnabled {
			args = append(args, "-race")
		}
		out, err := exec.Command("go", append(args, ".")...).CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return builtBinary
}

func mustRun(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// netnsPair is two namespaces, a and b, joined by the veth pair ve0 (in a) – ve1 (in b).
type netnsPair struct {
	a, b               string
	router             string // between them (newRoutedPair), or ""
	carrierA, carrierB netip.Addr
}

// newNetnsPair creates the namespaces (named after this process and a counter) and
// removes them, with everything in them, when the test ends.
func newNetnsPair(t *testing.T, ipv6 bool) *netnsPair {
	t.Helper()
	id := fmt.Sprintf("cpd%d-%d", os.Getpid(), nsCounter.Add(1))
	p := &netnsPair{a: id + "a", b: id + "b",
		carrierA: netip.MustParseAddr("198.18.0.1"), carrierB: netip.MustParseAddr("198.18.0.2")}
	if ipv6 {
		p.carrierA, p.carrierB = netip.MustParseAddr("2001:db8:c1::1"), netip.MustParseAddr("2001:db8:c1::2")
	}
	for _, ns := range []string{p.a, p.b} {
		mustRun(t, "ip", "netns", "add", ns)
		t.Cleanup(func() {
			exec.Command("ip", "netns", "del", ns).Run()
			os.RemoveAll(filepath.Join("/etc/netns", ns))
		})
		// ip netns exec mounts /etc/netns/NS/x over /etc/x: an empty cipe directory keeps
		// this machine's own /etc/cipe/options (if any) out of the test.
		if _, err := os.Stat("/etc/cipe"); err == nil {
			if err := os.MkdirAll(filepath.Join("/etc/netns", ns, "cipe"), 0o700); err != nil {
				t.Fatal(err)
			}
		}
	}
	mustRun(t, "ip", "link", "add", "ve0", "netns", p.a, "type", "veth", "peer", "name", "ve1", "netns", p.b)
	for _, end := range []struct {
		ns, dev string
		addr    netip.Addr
	}{{p.a, "ve0", p.carrierA}, {p.b, "ve1", p.carrierB}} {
		if ipv6 {
			mustRun(t, "ip", "-n", end.ns, "addr", "add", end.addr.String()+"/64", "dev", end.dev, "nodad")
		} else {
			mustRun(t, "ip", "-n", end.ns, "addr", "add", end.addr.String()+"/24", "dev", end.dev)
		}
		mustRun(t, "ip", "-n", end.ns, "link", "set", end.dev, "up")
		mustRun(t, "ip", "-n", end.ns, "link", "set", "lo", "up")
	}
	return p
}

// inNetns runs fn on a thread switched into the namespace; sockets fn opens stay there.
// fn must not start goroutines that open sockets.
func inNetns(ns string, fn func() error) error {
	runtime.LockOSThread()
	orig, err := os.Open("/proc/thread-self/ns/net")
	if err != nil {
		runtime.UnlockOSThread()
		return err
	}
	defer orig.Close()
	target, err := os.Open("/run/netns/" + ns)
	if err != nil {
		runtime.UnlockOSThread()
		return err
	}
	defer target.Close()
	if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("setns %s: %w", ns, err)
	}
	fnErr := fn()
	if err := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); err != nil {
		// Leave the thread locked: it is discarded when this goroutine ends.
		return fmt.Errorf("setns back: %w", err)
	}
	runtime.UnlockOSThread()
	return fnErr
}

// syncBuffer is a bytes.Buffer safe for a process to write while the test reads.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// daemon is a ciped process started by a test.
type daemon struct {
	name   string
	cmd    *exec.Cmd
	log    *syncBuffer
	done   chan struct{}
	status int // exit status, once done is closed
}

// startDaemon runs ciped with args inside the namespace. It is killed (by its PID) when
// the test ends, if it still runs; its log is shown if the test failed.
func startDaemon(t *testing.T, name, ns string, args ...string) *daemon {
	t.Helper()
	return startDaemonEnv(t, name, ns, nil, args...)
}

// startDaemonEnv is startDaemon with variables added to the environment.
func startDaemonEnv(t *testing.T, name, ns string, env []string, args ...string) *daemon {
	t.Helper()
	d := &daemon{name: name, log: &syncBuffer{}, done: make(chan struct{})}
	// ip netns exec runs ciped in place of itself: the PID is ciped's.
	d.cmd = exec.Command("ip", append([]string{"netns", "exec", ns, cipedBinary(t)}, args...)...)
	d.cmd.Env = append(os.Environ(), env...)
	d.cmd.Stdout, d.cmd.Stderr = d.log, d.log
	if err := d.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		err := d.cmd.Wait()
		d.status = d.cmd.ProcessState.ExitCode()
		if ee, ok := err.(*exec.ExitError); ok {
			if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
				d.status = 128 + int(ws.Signal())
			}
		}
		close(d.done)
	}()
	t.Cleanup(func() {
		// SIGTERM first, so that it takes down its interface and status socket as in
		// real life; SIGKILL if it does not go.
		select {
		case <-d.done:
		default:
			d.cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-d.done:
			case <-time.After(10 * time.Second):
				d.cmd.Process.Kill()
				<-d.done
			}
		}
		if t.Failed() {
			t.Logf("log of %s (pid %d):\n%s", d.name, d.cmd.Process.Pid, d.log.String())
		}
	})
	return d
}

func (d *daemon) pid() int { return d.cmd.Process.Pid }

func (d *daemon) running() bool {
	select {
	case <-d.done:
		return false
	default:
		return true
	}
}

// waitLog waits until the log matches re; it fails the test if the process exits or
// the bound passes first.
func (d *daemon) waitLog(t *testing.T, re string, bound time.Duration) {
	t.Helper()
	rx := regexp.MustCompile(re)
	deadline := time.Now().Add(bound)
	for !rx.MatchString(d.log.String()) {
		if !d.running() {
			t.Fatalf("%s exited (status %d) before logging %q", d.name, d.status, re)
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s did not log %q within %v", d.name, re, bound)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// count reports how many lines of the log match re.
func (d *daemon) count(re string) int {
	return len(regexp.MustCompile("(?m)"+re).FindAllString(d.log.String(), -1))
}

// terminate sends SIGTERM and returns the exit status.
func (d *daemon) terminate(t *testing.T) int {
	t.Helper()
	if err := d.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case <-d.done:
		return d.status
	case <-time.After(30 * time.Second):
		t.Fatalf("%s did not exit within 30 s of SIGTERM", d.name)
		return -1
	}
}

// keyFile writes an options file holding a key (mode 0600) and returns its path.
func keyFile(t *testing.T, dir, name, key string) string {
	t.Helper()
	return writeFile(t, dir, name, "key "+key+"\n", 0o600)
}

// ping runs ping in a namespace and returns how many of count replies came back.
func ping(t *testing.T, ns, dst string, count int, interval string) int {
	t.Helper()
	out, _ := exec.Command("ip", "netns", "exec", ns, "ping", "-n", "-q", "-c", fmt.Sprint(count), "-i", interval,
		"-W", "2", dst).CombinedOutput()
	m := regexp.MustCompile(`(\d+) received`).FindStringSubmatch(string(out))
	if m == nil {
		t.Fatalf("ping %s from %s: unexpected output:\n%s", dst, ns, out)
	}
	var got int
	fmt.Sscan(m[1], &got)
	return got
}
