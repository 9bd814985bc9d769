package main

// Two-core crypto: a helper goroutine that seals or opens half of a large batch.

// cryptoHelper does the upper half of a batch's AEAD work on another core while the loop
// that owns the batch does the lower half. Each packet's place in the batch (its slot in
// the send arena, its position in the receive batch) is fixed before the work is split,
// so the order of packets does not change. It costs one handoff per batch, never one per
// packet; a loop without a helper (one core) runs its batches as before.
type cryptoHelper struct {
	work     func(half, from, to int)
	start    chan struct{}
	done     chan struct{}
	from, to int
}

// newCryptoHelper starts a helper goroutine running work (bound once: no allocation per
// batch). The owner must call stop when it is done with it.
func newCryptoHelper(work func(half, from, to int)) *cryptoHelper {
	h := &cryptoHelper{work: work, start: make(chan struct{}), done: make(chan struct{})}
	go h.routineHelp()
	return h
}

func (h *cryptoHelper) routineHelp() {
	for range h.start {
		h.work(1, h.from, h.to)
		h.done <- struct{}{}
	}
}

// split runs work over [0, n): the helper takes the upper half, the caller the lower; it
// returns when both are done.
func (h *cryptoHelper) split(n int) {
	k := n / 2
	h.from, h.to = k, n
	h.start <- struct{}{}
	h.work(0, 0, k)
	<-h.done
}

// stop ends the helper goroutine.
func (h *cryptoHelper) stop() { close(h.start) }
