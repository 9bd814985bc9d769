package main

// Link scripts: ip-up and ip-down with CIPE's arguments, run one at a time in the order
// the link queued them, in a goroutine of their own.

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"strings"
	"time"
)

const (
	scriptTimeout   = 2 * time.Minute // a script still running then is killed
	scriptQueueSize = 16              // link changes waiting for their scripts
	scriptOutputMax = 4096            // bytes of a script's output that are logged
)

// scriptCall is one run of ip-up or ip-down with CIPE's arguments:
// $1 interface, $2 our carrier ip:port, $3 ciped's PID, $4 ipaddr, $5 ptpaddr, $6 arg.
// env adds what CIPE never passed (the peer's carrier address, the cipher, the reason).
type scriptCall struct {
	name string // "ip-up" or "ip-down", for the log
	path string
	args [6]string
	env  []string
}

// scriptRunner runs link scripts one after another in the order they were queued, in a
// goroutine of its own, so that the data path never waits for them and an ip-down never
// overtakes its ip-up.
type scriptRunner struct {
	log   *logger
	queue chan scriptCall
	done  chan struct{}
}

func newScriptRunner(log *logger) *scriptRunner {
	r := &scriptRunner{log: log, queue: make(chan scriptCall, scriptQueueSize), done: make(chan struct{})}
	go r.routineRun()
	return r
}

// enqueue schedules a script. It must not be called after close.
func (r *scriptRunner) enqueue(c scriptCall) {
	if c.path == "" {
		r.log.Debugf("%s: no script configured", c.name)
		return
	}
	r.queue <- c
}

// close waits until every queued script has run.
func (r *scriptRunner) close() {
	close(r.queue)
	<-r.done
}

func (r *scriptRunner) routineRun() {
	defer close(r.done)
	for c := range r.queue {
		r.run(c)
	}
}

func (r *scriptRunner) run(c scriptCall) {
	ctx, cancel := context.WithTimeout(context.Background(), scriptTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, c.path, c.args[:]...)
	cmd.Env = append(os.Environ(), c.env...)
	cmd.Dir = "/"
	var out limitedBuffer
	cmd.Stdout, cmd.Stderr = &out, &out
	r.log.Debugf("%s: running %s %s", c.name, c.path, strings.Join(c.args[:], " "))
	err := cmd.Run()
	sc := bufio.NewScanner(bytes.NewReader(out.Bytes()))
	for sc.Scan() {
		r.log.Printf("%s: %s", c.name, sc.Text())
	}
	if out.truncated {
		r.log.Printf("%s: (more output not shown)", c.name)
	}
	switch {
	case errors.Is(ctx.Err(), context.DeadlineExceeded):
		r.log.Printf("%s: %s killed after %v", c.name, c.path, scriptTimeout)
	case err != nil:
		r.log.Printf("%s: %s failed: %v", c.name, c.path, err)
	default:
		r.log.Debugf("%s: %s done", c.name, c.path)
	}
}

// limitedBuffer keeps the first scriptOutputMax bytes written to it.
type limitedBuffer struct {
	bytes.Buffer
	truncated bool
}

func (b *limitedBuffer) Write(p []byte) (int, error) {
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
