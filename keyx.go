package main

// Key exchange: PROTOCOL.md §2, §3 and §5. The Noise layer (noiseHandshake) follows the
// Noise specification for the NNpsk0 pattern alone; the message layer around it
// (keyExchange) adds ciped's header, mac, freshness and payload rules.

import (
	"bytes"
	"crypto/ecdh"
	"crypto/hmac"
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
	noiseProtocolName = "Noise_NNpsk0_25519_ChaChaPoly_SHA256" // §3
	prologueLabel     = "ciped v1"                             // §3: prologue prefix
	pskLabel          = "ciped v1 psk"                         // §2
	macLabel          = "ciped v1 mac"                         // §2
	linkKeySize       = 16                                     // §2: the `key` option
	noiseKeySize      = 32                                     // §3: Noise cipher keys and hash outputs
)

// linkSecrets are the keys derived from the link key (PROTOCOL.md §2).
type linkSecrets struct {
	psk    [noiseKeySize]byte
	macKey [noiseKeySize]byte
}

func deriveLinkSecrets(linkKey [linkKeySize]byte) linkSecrets {
	var s linkSecrets
	copy(s.psk[:], hmacSum(linkKey[:], []byte(pskLabel)))
	copy(s.macKey[:], hmacSum(linkKey[:], []byte(macLabel)))
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

// noiseHandshake is the state of one NNpsk0 handshake (Noise specification §5, §9). It
// is not safe for concurrent use. Its methods must be called in protocol order:
// initiator writeMessage1, readMessage2, split; responder readMessage1, writeMessage2,
// split.
type noiseHandshake struct {
	ck, h     [noiseKeySize]byte
	k         [noiseKeySize]byte
	hasKey    bool
	n         uint64
	ephemeral *ecdh.PrivateKey
	remoteE   *ecdh.PublicKey
	psk       [noiseKeySize]byte
}

// newNoiseHandshake initialises the symmetric state with the protocol name and prologue.
// ephemeral is this side's ephemeral key; nil draws a fresh one.
func newNoiseHandshake(prologue []byte, psk [noiseKeySize]byte, ephemeral *ecdh.PrivateKey) (*noiseHandshake, error) {
	hs := &noiseHandshake{psk: psk, ephemeral: ephemeral}
	if hs.ephemeral == nil {
		var err error
		if hs.ephemeral, err = ecdh.X25519().GenerateKey(rand.Reader); err != nil {
			return nil, err
		}
	}
	if len(noiseProtocolName) <= noiseKeySize {
		copy(hs.h[:], noiseProtocolName)
	} else {
		hs.h = sha256.Sum256([]byte(noiseProtocolName))
	}
	hs.ck = hs.h
	hs.mixHash(prologue)
	return hs, nil
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

// encryptAndHash appends the encryption of plaintext to dst. Every message of NNpsk0 is
// sent after a key is mixed in, so there is always a key.
func (hs *noiseHandshake) encryptAndHash(dst, plaintext []byte) []byte {
	aead, _ := chacha20poly1305.New(hs.k[:])
	start := len(dst)
	dst = aead.Seal(dst, hs.noiseNonce(), plaintext, hs.h[:])
	hs.n++
	hs.mixHash(dst[start:])
	return dst
}

func (hs *noiseHandshake) decryptAndHash(ciphertext []byte) ([]byte, error) {
	aead, _ := chacha20poly1305.New(hs.k[:])
	plaintext, err := aead.Open(nil, hs.noiseNonce(), ciphertext, hs.h[:])
	if err != nil {
		return nil, errAuth
	}
	hs.n++
	hs.mixHash(ciphertext)
	return plaintext, nil
}

// writeE and readE handle the "e" token of a PSK handshake: hash the key, and mix it in.
func (hs *noiseHandshake) writeE(dst []byte) []byte {
	pub := hs.ephemeral.PublicKey().Bytes()
	hs.mixHash(pub)
	hs.mixKey(pub)
	return append(dst, pub...)
}

func (hs *noiseHandshake) readE(msg []byte) error {
	pub, err := ecdh.X25519().NewPublicKey(msg[:publicKeySize])
	if err != nil {
		return errMalformed
	}
	hs.remoteE = pub
	hs.mixHash(pub.Bytes())
	hs.mixKey(pub.Bytes())
	return nil
}

func (hs *noiseHandshake) mixEE() error {
	shared, err := hs.ephemeral.ECDH(hs.remoteE)
	if err != nil { // a low-order point: the all-zero output is refused
		return errAuth
	}
	hs.mixKey(shared)
	return nil
}

// writeMessage1 appends "-> psk, e" with the payload to dst.
func (hs *noiseHandshake) writeMessage1(dst, payload []byte) []byte {
	hs.mixKeyAndHash(hs.psk[:])
	dst = hs.writeE(dst)
	return hs.encryptAndHash(dst, payload)
}

// readMessage1 consumes "-> psk, e" and returns the payload. It does no DH.
func (hs *noiseHandshake) readMessage1(msg []byte) ([]byte, error) {
	if len(msg) < publicKeySize+tagSize {
		return nil, errMalformed
	}
	hs.mixKeyAndHash(hs.psk[:])
	if err := hs.readE(msg); err != nil {
		return nil, err
	}
	return hs.decryptAndHash(msg[publicKeySize:])
}

// writeMessage2 appends "<- e, ee" with the payload to dst.
func (hs *noiseHandshake) writeMessage2(dst, payload []byte) ([]byte, error) {
	dst = hs.writeE(dst)
	if err := hs.mixEE(); err != nil {
		return nil, err
	}
	return hs.encryptAndHash(dst, payload), nil
}

// readMessage2 consumes "<- e, ee" and returns the payload.
func (hs *noiseHandshake) readMessage2(msg []byte) ([]byte, error) {
	if len(msg) < publicKeySize+tagSize {
		return nil, errMalformed
	}
	if err := hs.readE(msg); err != nil {
		return nil, err
	}
	if err := hs.mixEE(); err != nil {
		return nil, err
	}
	return hs.decryptAndHash(msg[publicKeySize:])
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
var (
	errStale          = errors.New("initiation is not newer than the last one accepted (replay?)")
	errSkew           = errors.New("initiation timestamp is outside the tokxts window")
	errNotWaiting     = errors.New("response to no initiation we are waiting on (replay?)")
	errAbandoned      = errors.New("response to our initiation that lost a collision")
	errDuplicate      = errors.New("the peer's initiation again, as it resends it in a collision it wins")
	errReflected      = errors.New("peer claims our own tunnel address (reflected message?)")
	errNoCommonCipher = errors.New("no cipher in common with the peer")
	errCollisionWon   = errors.New("our own initiation wins the collision")
	errAddrChanged    = errors.New("the peer claims another tunnel address than the one learned")
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
	abandoned    uint32                  // the index of our last initiation abandoned in a collision
	collided     [12]byte                // the sender index and timestamp of the last initiation that lost a collision to ours
	lostTo       [12]byte                // ... of the last initiation that won a collision against ours (answered)
	lastSentTime uint64                  // greatest timestamp we sent
	lastPeerTime uint64                  // greatest initiation timestamp we accepted
	indexInUse   func(index uint32) bool // reports indices of live sessions; may be nil
	random       io.Reader               // source of indices; nil: crypto/rand
	// acceptAddr, if set, judges the tunnel address a peer claims while it is still to
	// be learned (no expected address): nil accepts it.
	acceptAddr func(netip.Addr) error
}

type pendingInitiation struct {
	hs      *noiseHandshake
	index   uint32
	sentAt  time.Time
	secrets linkSecrets // the key it was made with: its response must be under the same
	message [initiationSize]byte
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

// initiate starts a new exchange, replacing any pending one, and returns the initiation
// to send. now is monotonic time.
func (kx *keyExchange) initiate(now time.Time) ([]byte, error) {
	return kx.initiateWith(now, nil)
}

// initiateWith is initiate with a given ephemeral key; tests pass a fixed one.
func (kx *keyExchange) initiateWith(now time.Time, ephemeral *ecdh.PrivateKey) ([]byte, error) {
	p := &pendingInitiation{index: kx.newIndex(), sentAt: now, secrets: kx.cfg.secrets}
	ts := uint64(kx.wallClock().UnixNano())
	if ts <= kx.lastSentTime {
		ts = kx.lastSentTime + 1
	}
	m := p.message[:0]
	m = append(m, protocolVersion, messageInitiation, 0, 0)
	m = binary.BigEndian.AppendUint32(m, p.index)
	m = binary.BigEndian.AppendUint64(m, ts)
	hs, err := newNoiseHandshake(append([]byte(prologueLabel), m...), kx.cfg.secrets.psk, ephemeral)
	if err != nil {
		return nil, err
	}
	p.hs = hs
	m = hs.writeMessage1(m, kx.payload(kx.cfg.ciphers))
	mac := kx.cfg.secrets.mac(m)
	m = append(m, mac[:]...)
	if len(m) != initiationSize {
		panic("initiation size")
	}
	kx.pending, kx.lastSentTime = p, ts
	return p.message[:], nil
}

// consumeInitiation processes an initiation (§3.4). On success it returns the response to
// send and the new, unconfirmed session. now is monotonic time.
func (kx *keyExchange) consumeInitiation(msg []byte, now time.Time) ([]byte, *exchangeResult, error) {
	return kx.consumeInitiationWith(msg, now, nil)
}

func (kx *keyExchange) consumeInitiationWith(msg []byte, now time.Time, ephemeral *ecdh.PrivateKey) ([]byte, *exchangeResult, error) {
	if len(msg) != initiationSize || msg[offsetVersion] != protocolVersion || msg[offsetType] != messageInitiation {
		return nil, nil, errMalformed
	}
	secrets, old := kx.secretsFor(msg[:initiationOffMAC], msg[initiationOffMAC:])
	if secrets == nil {
		return nil, nil, errAuth
	}
	ts := binary.BigEndian.Uint64(msg[initiationOffTime:])
	if ts <= kx.lastPeerTime {
		// A copy of an initiation that met ours: the peer resends its initiation when it
		// wins a collision, whether we saw the first (and lost: we answered it) or not (and
		// won). Not a replay to report, but refused all the same.
		if h := [12]byte(msg[initiationOffSender:initiationHeaderSize]); h == kx.collided || h == kx.lostTo {
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
	hs, err := newNoiseHandshake(append([]byte(prologueLabel), msg[:initiationHeaderSize]...), secrets.psk, ephemeral)
	if err != nil {
		return nil, nil, err
	}
	plain, err := hs.readMessage1(msg[initiationOffNoise:initiationOffMAC])
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
		kx.collided = [12]byte(msg[initiationOffSender:initiationHeaderSize])
		return nil, nil, errCollisionWon
	}

	remoteIndex := binary.BigEndian.Uint32(msg[initiationOffSender:])
	localIndex := kx.newIndex()
	resp := make([]byte, 0, responseSize)
	resp = append(resp, protocolVersion, messageResponse, 0, 0)
	resp = binary.BigEndian.AppendUint32(resp, localIndex)
	resp = binary.BigEndian.AppendUint32(resp, remoteIndex)
	if resp, err = hs.writeMessage2(resp, kx.payload(suite)); err != nil {
		return nil, nil, err
	}
	mac := secrets.mac(resp)
	resp = append(resp, mac[:]...)

	k1, k2 := hs.split()
	s, err := newSession(suite, k1[:], k2[:], false, localIndex, remoteIndex, now)
	if err != nil {
		return nil, nil, err
	}
	kx.lastPeerTime = ts
	if kx.pending != nil { // the collision rule: we answer theirs and abandon ours
		kx.abandoned = kx.pending.index
		kx.lostTo = [12]byte(msg[initiationOffSender:initiationHeaderSize])
	}
	kx.pending = nil
	peer.ciphers = suite
	return resp, &exchangeResult{session: s, peer: peer}, nil
}

// consumeResponse processes a response to our pending initiation (§3.4) and returns the
// new session, which is confirmed at once.
func (kx *keyExchange) consumeResponse(msg []byte, now time.Time) (*exchangeResult, error) {
	if len(msg) != responseSize || msg[offsetVersion] != protocolVersion || msg[offsetType] != messageResponse {
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
	hs := *p.hs // a failed attempt must leave the pending state usable
	plain, err := hs.readMessage2(msg[responseOffNoise:responseOffMAC])
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
