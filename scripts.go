package main

// Link scripts: ip-up and ip-down with CIPE's arguments, run one at a time in a goroutine
// of their own. The link tells the runner of each change (up, down) without ever
// waiting; the runner runs what the latest state needs, in order: an ip-down never
// overtakes its ip-up, nor runs without one, and changes that came and went while a
// script ran collapse into the one pair that still matters.

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"
)

const (
	scriptTimeout    = 2 * time.Minute  // a script still running then is killed, with its process group
	scriptPipeWait   = 2 * time.Second  // after a script exits, how long its output may stay open (a child it left behind)
	scriptsAtStopMax = 10 * time.Second // at shutdown, how long ciped waits for the scripts still to run
	scriptOutputMax  = 4096             // bytes of a script's output that are logged
)

// scriptCall is one run of ip-up or ip-down with CIPE's arguments:
// $1 interface, $2 our carrier ip:port, $3 ciped's PID, $4 ipaddr, $5 ptpaddr, $6 arg.
// env adds what CIPE never passed (the peer's carrier address, the cipher, the reason).
type scriptCall struct {
	name string // "ip-up" or "ip-down", for the log
	path string // "": no script
	args [6]string
	env  []string
}

// scriptRunner runs the link's scripts. up and down never block; close waits, within a
// bound, for what is still to run. It is safe for concurrent use.
type scriptRunner struct {
	log *logger
	// The bounds of scriptTimeout and scriptsAtStopMax; tests shorten them before use.
	timeout, atStop time.Duration

	mu       sync.Mutex
	pending  []scriptCall // what is still to run, in order: at most an ip-down, then an ip-up
	upRan    *scriptCall  // the ip-up that ran (or runs) and has had no ip-down yet
	closing  bool
	deadline time.Time     // while closing: when waiting ends
	running  func()        // cancels the script that runs now, if any
	wake     chan struct{} // a change to pending (buffer of one)
	done     chan struct{} // closed when the runner has ended
}

func newScriptRunner(log *logger) *scriptRunner {
	r := &scriptRunner{log: log, timeout: scriptTimeout, atStop: scriptsAtStopMax,
		wake: make(chan struct{}, 1), done: make(chan struct{})}
	go r.routineRun()
	return r
}

// up asks for ip-up (c) after whatever ip-down the link's last change still needs. A
// down that comes before c ran takes it back.
func (r *scriptRunner) up(c scriptCall) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closing {
		return
	}
	r.pending = append(r.pending, c)
	r.signal()
}

// down asks for ip-down (the script at path, "": none) with the arguments of the ip-up
// that ran, with env added (the reason). If that ip-up has not run yet, it never will,
// and there is nothing to undo.
func (r *scriptRunner) down(env []string, path string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if n := len(r.pending); n > 0 && r.pending[n-1].name == "ip-up" {
		r.pending = r.pending[:n-1] // an ip-up that never ran needs no ip-down
		return
	}
	if r.upRan == nil || len(r.pending) > 0 {
		return // nothing ran, or its ip-down is queued already
	}
	c := *r.upRan
	c.name, c.path = "ip-down", path
	c.env = append(append([]string(nil), c.env...), env...)
	r.pending = append(r.pending, c)
	r.signal()
}

func (r *scriptRunner) signal() {
	select {
	case r.wake <- struct{}{}:
	default:
	}
}

// close waits until the scripts asked for have run, at most scriptsAtStopMax: a script
// still running then is killed with its process group, and what was still to run is
// logged as not run. Later changes are ignored. It must be called once.
func (r *scriptRunner) close() {
	r.mu.Lock()
	r.closing = true
	r.deadline = time.Now().Add(r.atStop)
	r.signal()
	r.mu.Unlock()
	select {
	case <-r.done:
	case <-time.After(r.atStop):
		r.mu.Lock()
		if r.running != nil {
			r.running()
		}
		r.mu.Unlock()
		<-r.done
	}
}

func (r *scriptRunner) routineRun() {
	defer close(r.done)
	for {
		r.mu.Lock()
		if len(r.pending) == 0 {
			closing := r.closing
			r.mu.Unlock()
			if closing {
				return
			}
			<-r.wake
			continue
		}
		c := r.pending[0]
		r.pending = r.pending[1:]
		if c.name == "ip-up" {
			r.upRan = &c
		} else {
			r.upRan = nil
		}
		deadline := time.Now().Add(r.timeout)
		if r.closing && r.deadline.Before(deadline) {
			deadline = r.deadline
		}
		ctx, cancel := context.WithDeadline(context.Background(), deadline)
		r.running = cancel
		r.mu.Unlock()
		r.run(ctx, c)
		cancel()
		r.mu.Lock()
		r.running = nil
		if r.closing && !time.Now().Before(r.deadline) {
			for _, left := range r.pending {
				r.log.Printf("%s: not run: ciped waits %v for the scripts at shutdown", left.name, r.atStop)
			}
			r.pending = nil
		}
		r.mu.Unlock()
	}
}

// run runs one script until it exits, or until ctx ends: then the script is killed with
// its whole process group. Its output is logged line by line. A child the script left
// running in the background after it exited is not waited for (beyond scriptPipeWait for
// the output it shares), nor killed.
func (r *scriptRunner) run(ctx context.Context, c scriptCall) {
	if c.path == "" {
		r.log.Debugf("%s: no script configured", c.name)
		return
	}
	cmd := exec.CommandContext(ctx, c.path, c.args[:]...)
	cmd.Env = append(os.Environ(), c.env...)
	cmd.Dir = "/"
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = scriptPipeWait
	var out limitedBuffer
	cmd.Stdout, cmd.Stderr = &out, &out
	r.log.Debugf("%s: running %s %s", c.name, c.path, strings.Join(c.args[:], " "))
	started := time.Now()
	err := cmd.Run()
	out.mu.Lock()
	sc := bufio.NewScanner(bytes.NewReader(out.Bytes()))
	truncated := out.truncated
	out.mu.Unlock()
	for sc.Scan() {
		r.log.Printf("%s: %s", c.name, sc.Text())
	}
	if truncated {
		r.log.Printf("%s: (more output not shown)", c.name)
	}
	switch {
	case ctx.Err() != nil:
		r.log.Printf("%s: %s killed after %v", c.name, c.path, time.Since(started).Round(time.Second))
	case errors.Is(err, exec.ErrWaitDelay):
		r.log.Debugf("%s: %s done; it left a process running that holds its output", c.name, c.path)
	case err != nil:
		r.log.Printf("%s: %s failed: %v", c.name, c.path, err)
	default:
		r.log.Debugf("%s: %s done", c.name, c.path)
	}
}

// limitedBuffer keeps the first scriptOutputMax bytes written to it. It is safe for
// concurrent use (a script's output may still be copied after WaitDelay gave up on it).
type limitedBuffer struct {
	mu sync.Mutex
	bytes.Buffer
	truncated bool
}

func (b *limitedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	room := scriptOutputMax - b.Len()
	if len(p) > room {
		b.truncated = true
		if room > 0 {
			b.Buffer.Write(p[:room])
		}
		return len(p), nil
	}
	return b.Buffer.Write(p)
}
