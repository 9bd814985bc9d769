package main

// Logging: the one logger a link writes through (injected, prefixed with the interface
// name), rate limits for lines that bad packets call forth, and the syslog writer.

import (
	"fmt"
	"io"
	"log/syslog"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// logger writes one line per event: "<interface>: <message>". It is safe for
// concurrent use; the zero value is not usable, make one with newLogger. Nothing that
// holds key material may be passed to it.
type logger struct {
	mu     sync.Mutex
	w      io.Writer
	prefix atomic.Pointer[string]
	debug  atomic.Bool
}

func newLogger(w io.Writer, prefix string, debug bool) *logger {
	l := &logger{w: w}
	l.debug.Store(debug)
	l.setPrefix(prefix)
	return l
}

// setPrefix changes the name lines start with (the interface name, once known).
func (l *logger) setPrefix(prefix string) { l.prefix.Store(&prefix) }

// Printf logs an event.
func (l *logger) Printf(format string, args ...any) {
	l.mu.Lock()
	defer l.mu.Unlock()
	fmt.Fprintf(l.w, "%s: %s\n", *l.prefix.Load(), fmt.Sprintf(format, args...))
}

// Debugf logs detail that only the debug option asks for.
func (l *logger) Debugf(format string, args ...any) {
	if l.debug.Load() {
		l.Printf(format, args...)
	}
}

// rateLimit lets one line through per interval and counts what it held back, so that a
// flood of bad packets cannot flood the log. It is safe for concurrent use.
type rateLimit struct {
	interval   time.Duration
	mu         sync.Mutex
	next       time.Time
	suppressed int
}

// allow reports whether a line may be logged now, and how many were held back since
// the last one that was.
func (r *rateLimit) allow(now time.Time) (ok bool, suppressed int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if now.Before(r.next) {
		r.suppressed++
		return false, 0
	}
	r.next = now.Add(r.interval)
	suppressed, r.suppressed = r.suppressed, 0
	return true, suppressed
}

// limitedf logs through a rate limit, noting how many similar lines it held back.
func (l *logger) limitedf(r *rateLimit, format string, args ...any) {
	ok, held := r.allow(time.Now())
	if !ok {
		return
	}
	msg := fmt.Sprintf(format, args...)
	if held > 0 {
		msg += fmt.Sprintf(" (%d similar lines held back)", held)
	}
	l.Printf("%s", msg)
}

// syslogWriter sends each log line to syslog as one message (facility daemon, severity
// info, tag "ciped"). network and addr name the syslog socket; empty means the
// system's (/dev/log).
type syslogWriter struct{ w *syslog.Writer }

func newSyslogWriter(network, addr string) (*syslogWriter, error) {
	var w *syslog.Writer
	var err error
	if addr == "" {
		w, err = syslog.New(syslog.LOG_DAEMON|syslog.LOG_INFO, "ciped")
	} else {
		w, err = syslog.Dial(network, addr, syslog.LOG_DAEMON|syslog.LOG_INFO, "ciped")
	}
	if err != nil {
		return nil, fmt.Errorf("syslog: %w", err)
	}
	return &syslogWriter{w: w}, nil
}

func (s *syslogWriter) Write(p []byte) (int, error) {
	if err := s.w.Info(strings.TrimSuffix(string(p), "\n")); err != nil {
		return 0, err
	}
	return len(p), nil
}
