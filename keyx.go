package main

// Key exchange: PROTOCOL.md §2, §3 and §5. The Noise layer (noiseHandshake) follows the
// Noise specification and its HFS extension for the tokens NNhfs+psk0 uses, one method
// per token; the message layer around it (keyExchange) adds ciped's header, parts, mac,
// freshness and payload rules.

import (
	"bytes"
	"crypto/ecdh"
	"crypto/hmac"
	"crypto/mlkem"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"time"

	"golang.org/x/crypto/chacha20poly1305"
)

const (
	noiseProtocolName = "Noise_NNhfs+psk0_25519+MLKEM768_ChaChaPoly_SHA256" // §3
	prologueLabel     = "ciped v2"                                          // §3: prologue prefix
	pskLabel          = "ciped v2 psk"                                      // §2
	macLabel          = "ciped v2 mac"                                      // §2
	v1MACLabel        = "ciped v1 mac"                                      // §10: to recognise a version-1 peer
	linkKeySize       = 16                                                  // §2: the `key` option
	noiseKeySize      = 32                                                  // §3: Noise cipher keys and hash outputs
)

// linkSecrets are the keys derived from the link key (PROTOCOL.md §2), and version 1's
// mac key, which only recognises a peer still speaking it (§10).
type linkSecrets struct {
	psk      [noiseKeySize]byte
	macKey   [noiseKeySize]byte
	v1MACKey [noiseKeySize]byte
}

func deriveLinkSecrets(linkKey [linkKeySize]byte) linkSecrets {
	var s linkSecrets
	copy(s.psk[:], hmacSum(linkKey[:], []byte(pskLabel)))
	copy(s.macKey[:], hmacSum(linkKey[:], []byte(macLabel)))
	copy(s.v1MACKey[:], hmacSum(linkKey[:], []byte(v1MACLabel)))
	return s
}

func hmacSum(key []byte, parts ...[]byte) []byte {
	m := hmac.New(sha256.New, key)
	for _, p := range parts {
		m.Write(p)
	}
	return m.Sum(nil)
}

// mac is the truncated HMAC that guards every key-exchange message (§3.1, §3.2).
func (s *linkSecrets) mac(msg []byte) [macSize]byte {
	var out [macSize]byte
	copy(out[:], hmacSum(s.macKey[:], msg))
	return out
}

func (s *linkSecrets) macValid(msg []byte, got []byte) bool {
	want := s.mac(msg)
	return subtle.ConstantTimeCompare(want[:], got) == 1
}

// noiseHandshake is the state of one Noise handshake (Noise specification §5, §9; the
// HFS extension §4): the symmetric state and this side's keys. It is not safe for
// concurrent use. ciped's pattern, NNhfs+psk0, is its four message methods, which must
// be called in protocol order: initiator writeMessage1, readMessage2, split; responder
// readMessage1, writeMessage2, split. The token methods serve the tests' other patterns
// too (the published vectors for NNpsk0 and XXhfs).
type noiseHandshake struct {
	ck, h     [noiseKeySize]byte
	k         [noiseKeySize]byte
	hasKey    bool
	n         uint64
	pskMode   bool // a PSK handshake: the e token also mixes the key in (Noise §9.2)
	ephemeral *ecdh.PrivateKey
	remoteE   *ecdh.PublicKey
	kem       *mlkem.DecapsulationKey768 // the initiator's e1 key pair
	remoteKEM *mlkem.EncapsulationKey768 // the responder's copy of the initiator's e1
	psk       [noiseKeySize]byte
	// encapsulate makes the ekem1 token's shared secret and ciphertext; nil: ML-KEM's own
	// random encapsulation. Known-answer tests fix it.
	encapsulate func(*mlkem.EncapsulationKey768) (sharedKey, ciphertext []byte)
}

// newNoiseHandshake starts an NNhfs+psk0 handshake with the prologue. ephemeral and kem
// are this side's ephemeral keys (kem only the initiator's); nil draws fresh ones when
// they are needed.
func newNoiseHandshake(prologue []byte, psk [noiseKeySize]byte, ephemeral *ecdh.PrivateKey, kem *mlkem.DecapsulationKey768) *noiseHandshake {
	hs := &noiseHandshake{psk: psk, pskMode: true, ephemeral: ephemeral, kem: kem}
	hs.start(noiseProtocolName, prologue)
	return hs
}

// start initialises the symmetric state with the protocol name and the prologue.
func (hs *noiseHandshake) start(name string, prologue []byte) {
	if len(name) <= noiseKeySize {
		hs.h = [noiseKeySize]byte{}
		copy(hs.h[:], name)
	} else {
		hs.h = sha256.Sum256([]byte(name))
	}
	hs.ck = hs.h
	hs.mixHash(prologue)
}

// hkdf is the Noise HKDF with two or three outputs.
func noiseHKDF(ck, ikm []byte, outputs int) (o1, o2, o3 [noiseKeySize]byte) {
	temp := hmacSum(ck, ikm)
	copy(o1[:], hmacSum(temp, []byte{1}))
	copy(o2[:], hmacSum(temp, o1[:], []byte{2}))
	if outputs == 3 {
		copy(o3[:], hmacSum(temp, o2[:], []byte{3}))
	}
	return
}

func (hs *noiseHandshake) mixHash(data []byte) {
	d := sha256.New()
	d.Write(hs.h[:])
	d.Write(data)
	d.Sum(hs.h[:0])
}

func (hs *noiseHandshake) mixKey(ikm []byte) {
	hs.ck, hs.k, _ = noiseHKDF(hs.ck[:], ikm, 2)
	hs.hasKey, hs.n = true, 0
}

func (hs *noiseHandshake) mixKeyAndHash(ikm []byte) {
	var th [noiseKeySize]byte
	hs.ck, th, hs.k = noiseHKDF(hs.ck[:], ikm, 3)
	hs.mixHash(th[:])
	hs.hasKey, hs.n = true, 0
}

func (hs *noiseHandshake) noiseNonce() []byte {
	var nonce [chacha20poly1305.NonceSize]byte
	binary.LittleEndian.PutUint64(nonce[4:], hs.n)
	return nonce[:]
}

// encryptAndHash appends the encryption of plaintext to dst (the plaintext itself while
// no key is set, which in NNhfs+psk0 never happens).
func (hs *noiseHandshake) encryptAndHash(dst, plaintext []byte) []byte {
	start := len(dst)
	if !hs.hasKey {
		dst = append(dst, plaintext...)
	} else {
		aead, _ := chacha20poly1305.New(hs.k[:])
		dst = aead.Seal(dst, hs.noiseNonce(), plaintext, hs.h[:])
		hs.n++
	}
	hs.mixHash(dst[start:])
	return dst
}

func (hs *noiseHandshake) decryptAndHash(ciphertext []byte) ([]byte, error) {
	plaintext := ciphertext
	if hs.hasKey {
		aead, _ := chacha20poly1305.New(hs.k[:])
		var err error
		if plaintext, err = aead.Open(nil, hs.noiseNonce(), ciphertext, hs.h[:]); err != nil {
			return nil, errAuth
		}
		hs.n++
	}
	hs.mixHash(ciphertext)
	return plaintext, nil
}

// sealedSize is the size of n bytes after encryptAndHash.
func (hs *noiseHandshake) sealedSize(n int) int {
	if hs.hasKey {
		return n + tagSize
	}
	return n
}

// writeE and readE are the e token: the X25519 public key in the clear, hashed, and in a
// PSK handshake mixed in as a key too.
func (hs *noiseHandshake) writeE(dst []byte) ([]byte, error) {
	if hs.ephemeral == nil {
		var err error
		if hs.ephemeral, err = ecdh.X25519().GenerateKey(rand.Reader); err != nil {
			return nil, err
		}
	}
	pub := hs.ephemeral.PublicKey().Bytes()
	hs.mixHash(pub)
	if hs.pskMode {
		hs.mixKey(pub)
	}
	return append(dst, pub...), nil
}

// readE consumes the e token from the start of msg and returns the rest.
func (hs *noiseHandshake) readE(msg []byte) ([]byte, error) {
	if len(msg) < publicKeySize {
		return nil, errMalformed
	}
	pub, err := ecdh.X25519().NewPublicKey(msg[:publicKeySize])
	if err != nil {
		return nil, errMalformed
	}
	hs.remoteE = pub
	hs.mixHash(pub.Bytes())
	if hs.pskMode {
		hs.mixKey(pub.Bytes())
	}
	return msg[publicKeySize:], nil
}

// mixEE is the ee token: the X25519 result of the two ephemeral keys, mixed in.
func (hs *noiseHandshake) mixEE() error {
	shared, err := hs.ephemeral.ECDH(hs.remoteE)
	if err != nil { // a low-order point: the all-zero output is refused
		return errAuth
	}
	hs.mixKey(shared)
	return nil
}

// writeE1 is the e1 token (HFS §4): the ML-KEM encapsulation key, sent as a static key
// would be (encryptAndHash), and not mixed in as a key.
func (hs *noiseHandshake) writeE1(dst []byte) ([]byte, error) {
	if hs.kem == nil {
		var err error
		if hs.kem, err = mlkem.GenerateKey768(); err != nil {
			return nil, err
		}
	}
	return hs.encryptAndHash(dst, hs.kem.EncapsulationKey().Bytes()), nil
}

// readE1 consumes the e1 token from the start of msg and returns the rest. An
// encapsulation key that fails FIPS 203's check (a coefficient not below q) is refused.
func (hs *noiseHandshake) readE1(msg []byte) ([]byte, error) {
	n := hs.sealedSize(kemKeySize)
	if len(msg) < n {
		return nil, errMalformed
	}
	ek, err := hs.decryptAndHash(msg[:n])
	if err != nil {
		return nil, err
	}
	if hs.remoteKEM, err = mlkem.NewEncapsulationKey768(ek); err != nil {
		return nil, errMalformed
	}
	return msg[n:], nil
}

// writeEkem1 is the ekem1 token (HFS §4): encapsulate to the peer's e1, send the
// ciphertext (encryptAndHash), then mix the shared secret in as a key.
func (hs *noiseHandshake) writeEkem1(dst []byte) []byte {
	var shared, ct []byte
	if hs.encapsulate != nil {
		shared, ct = hs.encapsulate(hs.remoteKEM)
	} else {
		shared, ct = hs.remoteKEM.Encapsulate()
	}
	dst = hs.encryptAndHash(dst, ct)
	hs.mixKey(shared)
	return dst
}

// readEkem1 consumes the ekem1 token from the start of msg and returns the rest. ML-KEM
// decapsulation does not fail: a ciphertext not made for our key yields an unrelated
// secret, and the next tag fails.
func (hs *noiseHandshake) readEkem1(msg []byte) ([]byte, error) {
	n := hs.sealedSize(kemCiphertextSize)
	if len(msg) < n {
		return nil, errMalformed
	}
	ct, err := hs.decryptAndHash(msg[:n])
	if err != nil {
		return nil, err
	}
	shared, err := hs.kem.Decapsulate(ct)
	if err != nil {
		return nil, errMalformed
	}
	hs.mixKey(shared)
	return msg[n:], nil
}

// writeMessage1 appends "-> psk, e, e1" with the payload to dst: Noise message 1.
func (hs *noiseHandshake) writeMessage1(dst, payload []byte) ([]byte, error) {
	hs.mixKeyAndHash(hs.psk[:])
	dst, err := hs.writeE(dst)
	if err != nil {
		return nil, err
	}
	if dst, err = hs.writeE1(dst); err != nil {
		return nil, err
	}
	return hs.encryptAndHash(dst, payload), nil
}

// readMessage1 consumes "-> psk, e, e1" and returns the payload. It does no X25519 or
// ML-KEM operation.
func (hs *noiseHandshake) readMessage1(msg []byte) ([]byte, error) {
	if len(msg) != noiseMessage1Size {
		return nil, errMalformed
	}
	hs.mixKeyAndHash(hs.psk[:])
	rest, err := hs.readE(msg)
	if err != nil {
		return nil, err
	}
	if rest, err = hs.readE1(rest); err != nil {
		return nil, err
	}
	return hs.decryptAndHash(rest)
}

// writeMessage2 appends "<- e, ee, ekem1" with the payload to dst: Noise message 2.
func (hs *noiseHandshake) writeMessage2(dst, payload []byte) ([]byte, error) {
	dst, err := hs.writeE(dst)
	if err != nil {
		return nil, err
	}
	if err := hs.mixEE(); err != nil {
		return nil, err
	}
	dst = hs.writeEkem1(dst)
	return hs.encryptAndHash(dst, payload), nil
}

// readMessage2 consumes "<- e, ee, ekem1" and returns the payload.
func (hs *noiseHandshake) readMessage2(msg []byte) ([]byte, error) {
	if len(msg) != noiseMessage2Size {
		return nil, errMalformed
	}
	rest, err := hs.readE(msg)
	if err != nil {
		return nil, err
	}
	if err := hs.mixEE(); err != nil {
		return nil, err
	}
	if rest, err = hs.readEkem1(rest); err != nil {
		return nil, err
	}
	return hs.decryptAndHash(rest)
}

// split returns the initiator-to-responder and responder-to-initiator keys.
func (hs *noiseHandshake) split() (k1, k2 [noiseKeySize]byte) {
	k1, k2, _ = noiseHKDF(hs.ck[:], nil, 2)
	return k1, k2
}

// exchangePayload is the payload both key-exchange messages carry (PROTOCOL.md §3.3).
type exchangePayload struct {
	ciphers  cipherSuite
	mtu      uint16
	addr     netip.Addr // sender's tunnel address
	expected netip.Addr // tunnel address the sender expects of us; invalid if unknown
}

func (p exchangePayload) marshal() []byte {
	b := make([]byte, payloadSize)
	b[payloadOffCiphers] = byte(p.ciphers)
	binary.BigEndian.PutUint16(b[payloadOffMTU:], p.mtu)
	a := p.addr.As16()
	copy(b[payloadOffAddr:], a[:])
	if p.expected.IsValid() {
		e := p.expected.As16()
		copy(b[payloadOffExpected:], e[:])
	}
	return b
}

func parseExchangePayload(b []byte) (exchangePayload, error) {
	if len(b) != payloadSize {
		return exchangePayload{}, errMalformed
	}
	p := exchangePayload{
		ciphers: cipherSuite(b[payloadOffCiphers]),
		mtu:     binary.BigEndian.Uint16(b[payloadOffMTU:]),
		addr:    netip.AddrFrom16([16]byte(b[payloadOffAddr:payloadOffExpected])).Unmap(),
	}
	if e := [16]byte(b[payloadOffExpected:payloadSize]); e != [16]byte{} {
		p.expected = netip.AddrFrom16(e).Unmap()
	}
	return p, nil
}

// Reasons a key-exchange message is refused. errStale and errNotWaiting cover replays.
// The last four are expected in normal operation: not refusals to count or report.
var (
	errStale          = errors.New("initiation is not newer than the last one accepted (replay?)")
	errSkew           = errors.New("initiation timestamp is outside the tokxts window")
	errNotWaiting     = errors.New("response to no initiation we are waiting on (replay?)")
	errReflected      = errors.New("peer claims our own tunnel address (reflected message?)")
	errNoCommonCipher = errors.New("no cipher in common with the peer")
	errCollisionWon   = errors.New("our own initiation wins the collision")
	errAddrChanged    = errors.New("the peer claims another tunnel address than the one learned")
	errAbandoned      = errors.New("response to our initiation that lost a collision")
	errDuplicate      = errors.New("a copy of a part already received, or of the peer's initiation resent in a collision it wins")
	errSuperseded     = errors.New("part of an initiation older than the one being received")
	errAwaitingPart   = errors.New("one part kept, waiting for the other")
)

// exchangeConfig is what the key exchange needs to know about this side of the link.
type exchangeConfig struct {
	secrets  linkSecrets   // from the link key: initiations are made, and checked first, with these
	old      *linkSecrets  // from the old key during a rotation: accepted, never used to initiate; nil: none
	ciphers  cipherSuite   // ciphers we accept
	mtu      int           // our interface MTU, sent to the peer
	addr     netip.Addr    // our tunnel address (ipaddr)
	expected netip.Addr    // the peer's tunnel address (ptpaddr); invalid: learn it
	learned  bool          // expected was learned from the peer, not configured
	tokxts   time.Duration // 0: no timestamp window
}

// keyExchange runs this side of the key exchanges of one link (PROTOCOL.md §3, §3.4). It
// is not safe for concurrent use: the control loop owns it.
type keyExchange struct {
	cfg          exchangeConfig
	wallClock    func() time.Time // for timestamps; monotonic time is passed in
	pending      *pendingInitiation
	initiation   partStore               // the parts of the initiation being received (§3.4 step 4)
	abandoned    uint32                  // the index of our last initiation abandoned in a collision
	collided     [12]byte                // the sender index and timestamp of the last initiation that lost a collision to ours
	lostTo       [12]byte                // ... of the last initiation that won a collision against ours (answered)
	lastSentTime uint64                  // greatest timestamp we sent
	lastPeerTime uint64                  // greatest initiation timestamp we accepted
	lastV1Time   uint64                  // greatest timestamp of a version-1 initiation recognised (§10)
	indexInUse   func(index uint32) bool // reports indices of live sessions; may be nil
	random       io.Reader               // source of indices; nil: crypto/rand
	// acceptAddr, if set, judges the tunnel address a peer claims while it is still to
	// be learned (no expected address): nil accepts it.
	acceptAddr func(netip.Addr) error
	// encapsulate, if set, replaces ML-KEM's random encapsulation in the responses we
	// make: known-answer tests fix it.
	encapsulate func(*mlkem.EncapsulationKey768) (sharedKey, ciphertext []byte)
}

type pendingInitiation struct {
	hs       *noiseHandshake
	index    uint32
	sentAt   time.Time
	secrets  linkSecrets // the key it was made with: its response must be under the same
	parts    [exchangeParts][initiationPartSize]byte
	response partStore // the parts of its response as they come
}

// partsKeptFor is how long a part waits for the other (PROTOCOL.md §3.4 step 4): the two
// are sent one right after the other, so a part alone this long lost its sibling, and the
// initiator has sent, or will send, a new initiation.
const partsKeptFor = 5 * time.Second

// partStore keeps the halves of one Noise message as its parts arrive (PROTOCOL.md §3.4
// step 4), only ever after their mac and freshness passed.
type partStore struct {
	id   [12]byte           // names the message: sender index and timestamp, or sender index
	key  [noiseKeySize]byte // the mac key its parts were under
	from netip.AddrPort     // where its parts came from
	at   time.Time          // when the first part kept arrived (monotonic)
	have [exchangeParts]bool
	body [noiseMessage1Size]byte // the Noise message (message 2 uses the first noiseMessage2Size bytes)
}

// add keeps half (part of a Noise message of size bytes) under id, forgetting what it held
// of another message, under another key, from another address, or for partsKeptFor. It
// returns the whole message once both halves are there (and forgets them); errDuplicate
// for a half it holds; errAwaitingPart.
func (st *partStore) add(id [12]byte, key *linkSecrets, from netip.AddrPort, now time.Time, part int, half []byte, size int) ([]byte, error) {
	if !st.holds(now) || st.id != id || st.key != key.macKey || st.from != from {
		*st = partStore{id: id, key: key.macKey, from: from, at: now}
	}
	if st.have[part] {
		return nil, errDuplicate
	}
	st.have[part] = true
	copy(st.body[part*size/exchangeParts:], half)
	if !st.have[0] || !st.have[1] {
		return nil, errAwaitingPart
	}
	st.have = [exchangeParts]bool{}
	return st.body[:size], nil
}

// holds reports whether some part is kept, and not for partsKeptFor yet.
func (st *partStore) holds(now time.Time) bool {
	return (st.have[0] || st.have[1]) && now.Sub(st.at) < partsKeptFor
}

// exchangeResult is a session made by a key exchange, with what the peer told us.
type exchangeResult struct {
	session *session
	peer    exchangePayload
}

// newIndex draws a random non-zero index that no live session or pending exchange uses.
func (kx *keyExchange) newIndex() uint32 {
	var b [4]byte
	random := kx.random
	if random == nil {
		random = rand.Reader
	}
	for {
		if _, err := io.ReadFull(random, b[:]); err != nil {
			panic(err) // crypto/rand never fails on Linux ≥ 3.17; tests pass endless readers
		}
		i := binary.BigEndian.Uint32(b[:])
		if i != 0 && (kx.pending == nil || kx.pending.index != i) && (kx.indexInUse == nil || !kx.indexInUse(i)) {
			return i
		}
	}
}

func (kx *keyExchange) payload(ciphers cipherSuite) []byte {
	return exchangePayload{ciphers: ciphers, mtu: uint16(kx.cfg.mtu), addr: kx.cfg.addr, expected: kx.cfg.expected}.marshal()
}

// checkPeerPayload applies the address rules of §3.3.
func (kx *keyExchange) checkPeerPayload(p exchangePayload) error {
	switch {
	case p.addr == kx.cfg.addr:
		return errReflected
	case kx.cfg.learned && p.addr != kx.cfg.expected:
		return fmt.Errorf("%w: it says %s, it was %s (restart this ciped to let it change)", errAddrChanged, p.addr, kx.cfg.expected)
	case kx.cfg.expected.IsValid() && p.addr != kx.cfg.expected:
		return fmt.Errorf("peer's tunnel address is %s but ptpaddr is %s", p.addr, kx.cfg.expected)
	case p.expected.IsValid() && p.expected != kx.cfg.addr:
		return fmt.Errorf("peer expects our tunnel address to be %s but ipaddr is %s", p.expected, kx.cfg.addr)
	case !p.addr.IsValid() || p.addr.Is4() != kx.cfg.addr.Is4():
		return fmt.Errorf("peer's tunnel address %s is not of our ipaddr's family", p.addr)
	case !kx.cfg.expected.IsValid() && kx.acceptAddr != nil:
		if err := kx.acceptAddr(p.addr); err != nil {
			return fmt.Errorf("peer's tunnel address %s cannot be ours to learn: %w", p.addr, err)
		}
	}
	return nil
}

// secretsFor finds the key a message's mac is under (PROTOCOL.md §2): the link key first,
// then the old one, if there is one. A forged message costs one mac, or two during a
// rotation. old says whether it was the old key; nil secrets: neither.
func (kx *keyExchange) secretsFor(msg, mac []byte) (secrets *linkSecrets, old bool) {
	if kx.cfg.secrets.macValid(msg, mac) {
		return &kx.cfg.secrets, false
	}
	if kx.cfg.old != nil && kx.cfg.old.macValid(msg, mac) {
		return kx.cfg.old, true
	}
	return nil, false
}

// initiate starts a new exchange, replacing any pending one, and returns the two parts
// of the initiation to send. now is monotonic time.
func (kx *keyExchange) initiate(now time.Time) ([][]byte, error) {
	return kx.initiateWith(now, nil, nil)
}

// initiateWith is initiate with given ephemeral keys; tests pass fixed ones.
func (kx *keyExchange) initiateWith(now time.Time, ephemeral *ecdh.PrivateKey, kem *mlkem.DecapsulationKey768) ([][]byte, error) {
	p := &pendingInitiation{index: kx.newIndex(), sentAt: now, secrets: kx.cfg.secrets}
	ts := uint64(kx.wallClock().UnixNano())
	if ts <= kx.lastSentTime {
		ts = kx.lastSentTime + 1
	}
	header := make([]byte, 0, initiationHeaderSize)
	header = append(header, protocolVersion, messageInitiation, 0, 0)
	header = binary.BigEndian.AppendUint32(header, p.index)
	header = binary.BigEndian.AppendUint64(header, ts)
	hs := newNoiseHandshake(append([]byte(prologueLabel), header...), kx.cfg.secrets.psk, ephemeral, kem)
	body, err := hs.writeMessage1(make([]byte, 0, noiseMessage1Size), kx.payload(kx.cfg.ciphers))
	if err != nil {
		return nil, err
	}
	if len(body) != noiseMessage1Size {
		panic("noise message 1 size")
	}
	p.hs = hs
	out := make([][]byte, exchangeParts)
	for part := range exchangeParts {
		m := p.parts[part][:0]
		m = append(m, header...)
		m[offsetPart] = byte(part)
		m = append(m, body[part*noiseMessage1Size/exchangeParts:(part+1)*noiseMessage1Size/exchangeParts]...)
		mac := kx.cfg.secrets.mac(m)
		m = append(m, mac[:]...)
		if len(m) != initiationPartSize {
			panic("initiation part size")
		}
		out[part] = p.parts[part][:]
	}
	kx.pending, kx.lastSentTime = p, ts
	return out, nil
}

// pendingParts returns the two parts of the pending initiation, to be sent again.
func (kx *keyExchange) pendingParts() [][]byte {
	return [][]byte{kx.pending.parts[0][:], kx.pending.parts[1][:]}
}

// consumeInitiation processes a part of an initiation (PROTOCOL.md §3.4), come from the
// address from (the parts of one initiation must come from one address). With the second
// part it returns the two parts of the response to send and the new, unconfirmed session;
// with the first, errAwaitingPart. now is monotonic time.
func (kx *keyExchange) consumeInitiation(msg []byte, from netip.AddrPort, now time.Time) ([][]byte, *exchangeResult, error) {
	return kx.consumeInitiationWith(msg, from, now, nil)
}

func (kx *keyExchange) consumeInitiationWith(msg []byte, from netip.AddrPort, now time.Time, ephemeral *ecdh.PrivateKey) ([][]byte, *exchangeResult, error) {
	if len(msg) != initiationPartSize || msg[offsetVersion] != protocolVersion || msg[offsetType] != messageInitiation ||
		msg[offsetPart] >= exchangeParts {
		return nil, nil, errMalformed
	}
	secrets, old := kx.secretsFor(msg[:initiationOffMAC], msg[initiationOffMAC:])
	if secrets == nil {
		return nil, nil, errAuth
	}
	id := [12]byte(msg[initiationOffSender:initiationHeaderSize])
	ts := binary.BigEndian.Uint64(msg[initiationOffTime:])
	if ts <= kx.lastPeerTime {
		// A copy of an initiation that met ours: the peer resends its initiation when it
		// wins a collision, whether we saw the first (and lost: we answered it) or not (and
		// won). Not a replay to report, but refused all the same.
		if id == kx.collided || id == kx.lostTo {
			return nil, nil, errDuplicate
		}
		return nil, nil, errStale
	}
	if kx.cfg.tokxts > 0 {
		skew := time.Duration(int64(ts) - kx.wallClock().UnixNano())
		if skew > kx.cfg.tokxts || skew < -kx.cfg.tokxts {
			return nil, nil, fmt.Errorf("%w: clocks differ by %v", errSkew, skew.Round(time.Millisecond))
		}
	}
	if kx.initiation.holds(now) && kx.initiation.id != id && ts <= binary.BigEndian.Uint64(kx.initiation.id[4:]) {
		return nil, nil, errSuperseded
	}
	part := int(msg[offsetPart])
	body, err := kx.initiation.add(id, secrets, from, now, part, msg[initiationOffNoise:initiationOffMAC], noiseMessage1Size)
	if err != nil {
		return nil, nil, err
	}

	prologue := append([]byte(prologueLabel), protocolVersion, messageInitiation, 0, 0) // the header as in part 0
	prologue = append(prologue, id[:]...)
	hs := newNoiseHandshake(prologue, secrets.psk, ephemeral, nil)
	hs.encapsulate = kx.encapsulate
	plain, err := hs.readMessage1(body)
	if err != nil {
		return nil, nil, err
	}
	peer, err := parseExchangePayload(plain)
	if err != nil {
		return nil, nil, err
	}
	if err := kx.checkPeerPayload(peer); err != nil {
		return nil, nil, err
	}
	suite := kx.cfg.ciphers.choose(peer.ciphers)
	if suite == 0 {
		return nil, nil, fmt.Errorf("%w: peer offers %v, we accept %v", errNoCommonCipher, peer.ciphers, kx.cfg.ciphers)
	}
	// An initiation under the old key comes from a peer that does not have our key yet:
	// ours cannot win, whatever the rule says.
	if kx.pending != nil && !old && bytes.Compare(kx.pending.hs.ephemeral.PublicKey().Bytes(), hs.remoteE.Bytes()) > 0 {
		kx.lastPeerTime = ts // a copy of it (a replay) is stale from now on: it earns nothing more
		kx.collided = id
		return nil, nil, errCollisionWon
	}

	remoteIndex := binary.BigEndian.Uint32(msg[initiationOffSender:])
	localIndex := kx.newIndex()
	reply, err := hs.writeMessage2(make([]byte, 0, noiseMessage2Size), kx.payload(suite))
	if err != nil {
		return nil, nil, err
	}
	if len(reply) != noiseMessage2Size {
		panic("noise message 2 size")
	}
	resp := make([][]byte, exchangeParts)
	for part := range exchangeParts {
		m := make([]byte, 0, responsePartSize)
		m = append(m, protocolVersion, messageResponse, byte(part), 0)
		m = binary.BigEndian.AppendUint32(m, localIndex)
		m = binary.BigEndian.AppendUint32(m, remoteIndex)
		m = append(m, reply[part*noiseMessage2Size/exchangeParts:(part+1)*noiseMessage2Size/exchangeParts]...)
		mac := secrets.mac(m)
		resp[part] = append(m, mac[:]...)
	}

	k1, k2 := hs.split()
	s, err := newSession(suite, k1[:], k2[:], false, localIndex, remoteIndex, now)
	if err != nil {
		return nil, nil, err
	}
	kx.lastPeerTime = ts
	if kx.pending != nil { // the collision rule: we answer theirs and abandon ours
		kx.abandoned = kx.pending.index
		kx.lostTo = id
	}
	kx.pending = nil
	peer.ciphers = suite
	return resp, &exchangeResult{session: s, peer: peer}, nil
}

// consumeResponse processes a part of the response to our pending initiation
// (PROTOCOL.md §3.4), come from the address from. With the second part it returns the new
// session, which is confirmed at once; with the first, errAwaitingPart.
func (kx *keyExchange) consumeResponse(msg []byte, from netip.AddrPort, now time.Time) (*exchangeResult, error) {
	if len(msg) != responsePartSize || msg[offsetVersion] != protocolVersion || msg[offsetType] != messageResponse ||
		msg[offsetPart] >= exchangeParts {
		return nil, errMalformed
	}
	p := kx.pending
	if receiver := binary.BigEndian.Uint32(msg[responseOffReceiver:]); p == nil || receiver != p.index {
		if receiver != 0 && receiver == kx.abandoned {
			return nil, errAbandoned // the peer answered it before it saw ours: expected
		}
		return nil, errNotWaiting
	}
	if !p.secrets.macValid(msg[:responseOffMAC], msg[responseOffMAC:]) {
		return nil, errAuth
	}
	var id [12]byte
	copy(id[:], msg[responseOffSender:responseOffReceiver])
	body, err := p.response.add(id, &p.secrets, from, now, int(msg[offsetPart]), msg[responseOffNoise:responseOffMAC], noiseMessage2Size)
	if err != nil {
		return nil, err
	}
	hs := *p.hs // a failed attempt must leave the pending state usable
	plain, err := hs.readMessage2(body)
	if err != nil {
		return nil, err
	}
	peer, err := parseExchangePayload(plain)
	if err != nil {
		return nil, err
	}
	if err := kx.checkPeerPayload(peer); err != nil {
		return nil, err
	}
	if bitsSet(uint8(peer.ciphers)) != 1 || peer.ciphers&kx.cfg.ciphers == 0 {
		return nil, fmt.Errorf("%w: peer chose %v, we offered %v", errNoCommonCipher, peer.ciphers, kx.cfg.ciphers)
	}
	k1, k2 := hs.split()
	s, err := newSession(peer.ciphers, k1[:], k2[:], true, p.index, binary.BigEndian.Uint32(msg[responseOffSender:]), now)
	if err != nil {
		return nil, err
	}
	kx.pending = nil
	return &exchangeResult{session: s, peer: peer}, nil
}

// speaksVersion1 reports whether msg is a version-1 initiation from a holder of the link
// key (PROTOCOL.md §10): its mac is right under version 1's mac key (one mac), and its
// timestamp newer than that of the last one recognised, so that a recording of one,
// replayed, is recognised once.
func (kx *keyExchange) speaksVersion1(msg []byte) bool {
	if len(msg) != v1InitiationSize || msg[offsetVersion] != protocolVersion1 || msg[offsetType] != messageInitiation {
		return false
	}
	want := hmacSum(kx.cfg.secrets.v1MACKey[:], msg[:v1InitiationOffMAC])
	if subtle.ConstantTimeCompare(want[:macSize], msg[v1InitiationOffMAC:]) != 1 {
		return false
	}
	ts := binary.BigEndian.Uint64(msg[initiationOffTime:])
	if ts <= kx.lastV1Time {
		return false
	}
	kx.lastV1Time = ts
	return true
}

func bitsSet(b uint8) int {
	n := 0
	for ; b != 0; b &= b - 1 {
		n++
	}
	return n
}

// unknownSession builds the answer to a data message for a session we do not hold
// (PROTOCOL.md §4.5): its receiver index and counter, under the mac.
func (kx *keyExchange) unknownSession(receiver uint32, counter uint64) []byte {
	m := make([]byte, 0, unknownSessionSize)
	m = append(m, protocolVersion, messageUnknownSession, 0, 0)
	m = binary.BigEndian.AppendUint32(m, receiver)
	m = binary.BigEndian.AppendUint64(m, counter)
	mac := kx.cfg.secrets.mac(m)
	return append(m, mac[:]...)
}

// consumeUnknownSession checks an unknown-session message (PROTOCOL.md §4.5) and returns
// the receiver index and counter it names.
func (kx *keyExchange) consumeUnknownSession(msg []byte) (receiver uint32, counter uint64, err error) {
	if len(msg) != unknownSessionSize || msg[offsetVersion] != protocolVersion || msg[offsetType] != messageUnknownSession {
		return 0, 0, errMalformed
	}
	if secrets, _ := kx.secretsFor(msg[:unknownSessionOffMAC], msg[unknownSessionOffMAC:]); secrets == nil {
		return 0, 0, errAuth
	}
	return binary.BigEndian.Uint32(msg[unknownSessionOffReceiver:]), binary.BigEndian.Uint64(msg[unknownSessionOffCounter:]), nil
}
