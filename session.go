package main

// Sessions over time: the three a link holds (PROTOCOL.md §5), how they replace each
// other, and when one may no longer be used. The session itself, and sealing and opening
// data under it, is cipher.go's.

import (
	"sync"
	"sync/atomic"
	"time"
)

// keyring holds the sessions of PROTOCOL.md §5. Readers load the pointers without a lock;
// changes are serialised by mu. The control loop changes it; the inbound loop only
// confirms a responder's new session (confirm). The zero value is an empty keyring.
type keyring struct {
	mu       sync.Mutex
	current  atomic.Pointer[session]
	previous atomic.Pointer[session]
	next     atomic.Pointer[session] // a responder's session before the initiator used it
}

// rotate makes s current and the current one previous.
func (k *keyring) rotate(s *session) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.previous.Store(k.current.Load())
	k.current.Store(s)
	if k.next.Load() == s {
		k.next.Store(nil)
	}
}

func (k *keyring) setNext(s *session) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.next.Store(s)
}

// confirm rotates s in if it is still the unconfirmed session; it reports whether it was.
func (k *keyring) confirm(s *session) bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.next.Load() != s {
		return false
	}
	k.previous.Store(k.current.Load())
	k.current.Store(s)
	k.next.Store(nil)
	return true
}

// expire drops sessions older than maxAge and reports whether the current one went.
func (k *keyring) expire(now time.Time, maxAge time.Duration) (droppedCurrent bool) {
	k.mu.Lock()
	defer k.mu.Unlock()
	for _, p := range []*atomic.Pointer[session]{&k.current, &k.previous, &k.next} {
		if s := p.Load(); s != nil && now.Sub(s.created) >= maxAge {
			p.Store(nil)
			droppedCurrent = droppedCurrent || p == &k.current
		}
	}
	return droppedCurrent
}

// goodbye drops what the peer's goodbye under s ends (PROTOCOL.md §4.2): s, the sessions
// made before it, and those made after it that the peer never used (it said goodbye while
// they were on their way). A session made after s that the peer did use is a new life of
// the peer (it restarted, and the goodbye came late) and stays. It reports whether the
// current session went.
func (k *keyring) goodbye(s *session) (droppedCurrent bool) {
	k.mu.Lock()
	defer k.mu.Unlock()
	for _, p := range []*atomic.Pointer[session]{&k.current, &k.previous, &k.next} {
		if x := p.Load(); x != nil && (x == s || !x.created.After(s.created) || !x.received.Load()) {
			p.Store(nil)
			droppedCurrent = droppedCurrent || p == &k.current
		}
	}
	return droppedCurrent
}

func (k *keyring) clear() {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.current.Store(nil)
	k.previous.Store(nil)
	k.next.Store(nil)
}

// holdsIndex reports whether a held session uses index as its local index.
func (k *keyring) holdsIndex(index uint32) bool {
	for _, s := range []*session{k.current.Load(), k.previous.Load(), k.next.Load()} {
		if s != nil && s.localIndex == index {
			return true
		}
	}
	return false
}

// sessionLifetime is how long a session may send and receive (PROTOCOL.md §5, "reject
// by time"): tokey + 3·tokxc.
func sessionLifetime(tokey, tokxc time.Duration) time.Duration {
	return tokey + rejectAfterTokxcCount*tokxc
}

// usable reports whether s may still send or receive at now, given the lifetime of
// sessions.
func (s *session) usable(now time.Time, lifetime time.Duration) bool {
	return s != nil && now.Sub(s.created) < lifetime
}
