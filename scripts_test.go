package main

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// writeScript writes an executable shell script into dir and returns its path.
func writeScript(t *testing.T, dir, name, body string) string {
	t.Helper()
	path := filepath.Join(dir, name)
	if err := os.WriteFile(path, []byte("#!/bin/sh\n"+body), 0o755); err != nil {
		t.Fatal(err)
	}
	return path
}

// returnsWithin fails the test if fn does not return within bound.
func returnsWithin(t *testing.T, what string, bound time.Duration, fn func()) {
	t.Helper()
	done := make(chan struct{})
	go func() { defer close(done); fn() }()
	select {
	case <-done:
	case <-time.After(bound):
		t.Fatalf("%s did not return within %v", what, bound)
	}
}

// TestScriptLeavesAChild: an ip-up that starts a child in the background (cmd &) and
// exits is done when it exits: the next script runs although the child still holds the
// output pipe, and the child is left alone.
func TestScriptLeavesAChild(t *testing.T) {
	dir := t.TempDir()
	up := writeScript(t, dir, "ip-up", fmt.Sprintf("sleep 60 &\necho $! > %s/child\necho up >> %s/calls\n", dir, dir))
	down := writeScript(t, dir, "ip-down", fmt.Sprintf("echo down >> %s/calls\n", dir))
	r := newScriptRunner(newLogger(testLog{t: t, name: "scripts"}, "s", true))
	r.up(scriptCall{name: "ip-up", path: up})
	waitFor(t, "ip-up to run", 20*time.Second, func() bool {
		_, err := os.Stat(filepath.Join(dir, "calls"))
		return err == nil
	})
	r.down(nil, down)
	returnsWithin(t, "close", scriptPipeWait+20*time.Second, r.close)
	if got := readLines(t, filepath.Join(dir, "calls")); strings.Join(got, " ") != "up down" {
		t.Fatalf("scripts ran: %q", got)
	}
	b, err := os.ReadFile(filepath.Join(dir, "child"))
	if err != nil {
		t.Fatal(err)
	}
	pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	if pid <= 0 || syscall.Kill(pid, 0) != nil {
		t.Fatalf("the script's background child (pid %d) is gone", pid)
	}
	syscall.Kill(pid, syscall.SIGKILL)
}

// TestScriptHangs: a script that does not end is killed at the timeout, with its
// process group, and the next one runs; at shutdown a hanging script is killed when the
// bound passes and close returns; up and down never wait for a running script.
func TestScriptHangs(t *testing.T) {
	dir := t.TempDir()
	hang := writeScript(t, dir, "ip-up", fmt.Sprintf("sleep 60 &\necho $! >> %s/children\nsleep 60\n", dir))
	down := writeScript(t, dir, "ip-down", fmt.Sprintf("echo down >> %s/calls\n", dir))
	r := newScriptRunner(newLogger(testLog{t: t, name: "scripts"}, "s", true))
	r.timeout, r.atStop = time.Second, 2*time.Second
	r.up(scriptCall{name: "ip-up", path: hang})
	waitFor(t, "ip-up to run", 20*time.Second, func() bool {
		_, err := os.Stat(filepath.Join(dir, "children"))
		return err == nil
	})
	returnsWithin(t, "up and down while a script hangs", 5*time.Second, func() {
		for range 50 {
			r.down(nil, down)
			r.up(scriptCall{name: "ip-up", path: hang})
		}
	})
	// The first ip-up is killed after a second; then its ip-down runs; then the last
	// ip-up (the 49 between collapsed), which hangs again until close's bound.
	waitFor(t, "the first ip-down", 20*time.Second, func() bool {
		_, err := os.Stat(filepath.Join(dir, "calls"))
		return err == nil
	})
	returnsWithin(t, "close", r.atStop+scriptPipeWait+20*time.Second, r.close)
	if got := readLines(t, filepath.Join(dir, "calls")); len(got) != 1 {
		t.Fatalf("ip-down ran %d times, want once (ip-up, ip-down, ip-up: the flaps between collapse)", len(got))
	}
	children := readLines(t, filepath.Join(dir, "children"))
	if len(children) != 2 {
		t.Fatalf("ip-up ran %d times, want 2", len(children))
	}
	for _, c := range children {
		pid, _ := strconv.Atoi(c)
		waitFor(t, "the killed script's children to go", 10*time.Second, func() bool {
			return syscall.Kill(pid, 0) != nil
		})
	}
}

// TestScriptsCollapse: changes that come while a script runs collapse: after any
// sequence of ups and downs, the scripts that run alternate ip-up, ip-down, ..., start
// with ip-up, and end in the state of the last change.
func TestScriptsCollapse(t *testing.T) {
	dir := t.TempDir()
	up := writeScript(t, dir, "ip-up", fmt.Sprintf("sleep 0.05\necho \"up $6\" >> %s/calls\n", dir))
	down := writeScript(t, dir, "ip-down", fmt.Sprintf("echo \"down $6 $CIPED_REASON\" >> %s/calls\n", dir))
	for _, endUp := range []bool{true, false} {
		os.Remove(filepath.Join(dir, "calls"))
		r := newScriptRunner(newLogger(io.Discard, "s", false))
		for i := range 30 {
			r.up(scriptCall{name: "ip-up", path: up, args: [6]string{5: strconv.Itoa(i)}})
			if i < 29 || !endUp {
				r.down([]string{"CIPED_REASON=flap" + strconv.Itoa(i)}, down)
			}
			time.Sleep(time.Duration(i%3) * 20 * time.Millisecond)
		}
		r.close()
		var calls []string
		if _, err := os.Stat(filepath.Join(dir, "calls")); err == nil || endUp {
			calls = readLines(t, filepath.Join(dir, "calls"))
		}
		last := ""
		for i, c := range calls {
			kind, arg, _ := strings.Cut(c, " ")
			if (i%2 == 0) != (kind == "up") {
				t.Fatalf("end up=%v: call %d is %q: ups and downs do not alternate:\n%s", endUp, i, c, strings.Join(calls, "\n"))
			}
			if kind == "down" && !strings.HasPrefix(arg, last+" ") {
				t.Fatalf("end up=%v: %q does not undo the ip-up with $6=%s", endUp, c, last)
			}
			last, _, _ = strings.Cut(arg, " ")
		}
		if wantLast := map[bool]string{true: "up", false: "down"}[endUp]; len(calls) > 0 && !strings.HasPrefix(calls[len(calls)-1], wantLast) {
			t.Fatalf("end up=%v: the last script was %q", endUp, calls[len(calls)-1])
		}
		if endUp && calls[len(calls)-1] != "up 29" {
			t.Fatalf("the last ip-up ran with $6=%q, want the last change's 29", calls[len(calls)-1])
		}
		if len(calls) > 30 {
			t.Fatalf("%d scripts ran for 59 changes: nothing collapsed", len(calls))
		}
	}
}
