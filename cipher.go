package main

// Packet format and data encryption: PROTOCOL.md §1, §4, §7. Every size and offset of the
// wire format is named in the const block below, after the section that defines it.

import (
	"crypto/aes"
	"crypto/cipher"
	"encoding/binary"
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	"golang.org/x/crypto/chacha20poly1305"
	"golang.org/x/sys/cpu"
	"golang.zx2c4.com/wireguard/replay"
)

const (
	protocolVersion  = 2 // §1: first byte of every message
	protocolVersion1 = 1 // §10: the version 2 replaced

	messageInitiation = 1 // §3.1: type of the first key-exchange message
	messageResponse   = 2 // §3.2: type of the second key-exchange message
	messageData       = 3 // §4: type of a data message

	messageUnknownSession = 4 // §4.5: type of the answer to data for a session not held

	offsetVersion = 0 // §1: version byte
	offsetType    = 1 // §1: type byte
	offsetPart    = 2 // §3.1, §3.2: which half of the Noise message a key-exchange part carries

	exchangeParts             = 2                                                                   // §3: datagrams per key-exchange message
	initiationPartSize        = 674                                                                 // §3.1: size of each part of an initiation
	initiationOffSender       = 4                                                                   // §3.1: sender index
	initiationOffTime         = 8                                                                   // §3.1: timestamp
	initiationHeaderSize      = 16                                                                  // §3.1: bytes bound into the Noise prologue (with part 0)
	initiationOffNoise        = 16                                                                  // §3.1: start of the part's half of Noise message 1
	initiationOffMAC          = initiationOffNoise + noiseMessage1Size/exchangeParts                // §3.1: start of the mac: 658
	responsePartSize          = 622                                                                 // §3.2: size of each part of a response
	responseOffSender         = 4                                                                   // §3.2: sender index
	responseOffReceiver       = 8                                                                   // §3.2: receiver index
	responseOffNoise          = 12                                                                  // §3.2: start of the part's half of Noise message 2
	responseOffMAC            = responseOffNoise + noiseMessage2Size/exchangeParts                  // §3.2: start of the mac: 606
	macSize                   = 16                                                                  // §3.1, §3.2: size of the truncated HMAC
	publicKeySize             = 32                                                                  // §3: size of an X25519 public key
	kemKeySize                = 1184                                                                // §3: size of an ML-KEM-768 encapsulation key
	kemCiphertextSize         = 1088                                                                // §3: size of an ML-KEM-768 ciphertext
	payloadSize               = 36                                                                  // §3.3: size of the exchange payload
	payloadOffCiphers         = 0                                                                   // §3.3: cipher set or choice
	payloadOffMTU             = 2                                                                   // §3.3: sender's interface MTU
	payloadOffAddr            = 4                                                                   // §3.3: sender's tunnel address
	payloadOffExpected        = 20                                                                  // §3.3: tunnel address the sender expects of us
	noiseMessage1Size         = publicKeySize + kemKeySize + tagSize + payloadSize + tagSize        // §3: e, e1, payload: 1284
	noiseMessage2Size         = publicKeySize + kemCiphertextSize + tagSize + payloadSize + tagSize // §3: e, ee, ekem1, payload: 1188
	v1InitiationSize          = 116                                                                 // §10: a version-1 initiation
	v1InitiationOffMAC        = 100                                                                 // §10: start of its mac
	unknownSessionSize        = 32                                                                  // §4.5: size of an unknown-session message
	unknownSessionOffReceiver = 4                                                                   // §4.5: the receiver index of the data message
	unknownSessionOffCounter  = 8                                                                   // §4.5: its counter
	unknownSessionOffMAC      = 16                                                                  // §4.5: start of the mac
	dataHeaderSize            = 16                                                                  // §4: size of the data header
	dataOffFlags              = 2                                                                   // §4: flags byte
	dataOffReceiver           = 4                                                                   // §4: receiver index
	dataOffCounter            = 8                                                                   // §4: counter
	tagSize                   = 16                                                                  // §4: size of the AEAD tag
	dataOverhead              = dataHeaderSize + tagSize                                            // §4, §7: bytes added per packet
	carrierIPv4Overhead       = 20 + 8                                                              // §7: IPv4 + UDP headers
	carrierIPv6Overhead       = 40 + 8                                                              // §7: IPv6 + UDP headers
	carrierPathMTU            = 1500                                                                // §7: carrier MTU the default fits
	flagPing                  = 0x01                                                                // §4: asks for a keepalive in return
	flagGoodbye               = 0x02                                                                // §4: the sender is going down
	flagCsumPartial           = 0x04                                                                // §4: the inner checksum is partial
	flagProbe                 = 0x08                                                                // §4.6: a path MTU probe (padding, no packet)
	flagProbeAck              = 0x10                                                                // §4.6: acknowledges a probe (its size, no packet)
	probeAckSize              = 4                                                                   // §4.6: the plaintext of an acknowledgement
	rekeyAfterPackets         = 1 << 32                                                             // §5: rekey by count
	rejectAfterPackets        = 1 << 33                                                             // §5: reject by count
	rejectAfterTokxcCount     = 3                                                                   // §5: reject at tokey + 3·tokxc

	// §4: a data message with any other flag is dropped
	knownDataFlags = flagPing | flagGoodbye | flagCsumPartial | flagProbe | flagProbeAck
)

// cipherSuite names a data cipher; its value is the bit used for it in the exchange
// payload (PROTOCOL.md §3.3).
type cipherSuite uint8

const (
	cipherChaCha20Poly1305 cipherSuite = 0x01 // §3.3
	cipherAES256GCM        cipherSuite = 0x02 // §3.3
	knownCiphers                       = cipherChaCha20Poly1305 | cipherAES256GCM
)

func (c cipherSuite) String() string {
	switch c {
	case cipherChaCha20Poly1305:
		return "ChaCha20-Poly1305"
	case cipherAES256GCM:
		return "AES-256-GCM"
	}
	return fmt.Sprintf("cipher set %#02x", uint8(c))
}

// choose returns the cipher a responder picks from the initiator's offer and its own
// (PROTOCOL.md §3.3), or 0 if they have none in common.
func (c cipherSuite) choose(offered cipherSuite) cipherSuite {
	common := c & offered
	switch {
	case common&cipherAES256GCM != 0:
		return cipherAES256GCM
	case common&cipherChaCha20Poly1305 != 0:
		return cipherChaCha20Poly1305
	}
	return 0
}

// hasAESHardware reports whether this CPU seals AES-GCM in hardware; without it
// ChaCha20-Poly1305 is faster and constant-time.
func hasAESHardware() bool {
	return (cpu.X86.HasAES && cpu.X86.HasPCLMULQDQ) || (cpu.ARM64.HasAES && cpu.ARM64.HasPMULL)
}

// newAEAD returns the data AEAD of the given suite under a 32-byte session key.
func newAEAD(suite cipherSuite, key []byte) (cipher.AEAD, error) {
	switch suite {
	case cipherChaCha20Poly1305:
		return chacha20poly1305.New(key)
	case cipherAES256GCM:
		block, err := aes.NewCipher(key)
		if err != nil {
			return nil, err
		}
		return cipher.NewGCM(block)
	}
	return nil, fmt.Errorf("unknown cipher %v", suite)
}

// Errors of opening a data message; the receive path counts each separately.
var (
	errMalformed = errors.New("malformed message")
	errAuth      = errors.New("message failed authentication")
	errReplay    = errors.New("replayed message")
)

// A session is one set of data keys made by a key exchange (PROTOCOL.md §5).
//
// send and recv are safe for concurrent use. sendCounter is advanced atomically by
// whoever sends. replay and recvMax are used under the packet path's inbound lock
// (packetPath.inMu) only, and received is set there. All other fields are set before the
// session is published and never change.
type session struct {
	send        cipher.AEAD
	recv        cipher.AEAD
	suite       cipherSuite
	localIndex  uint32 // index the peer puts in data it sends us
	remoteIndex uint32 // index we put in data we send
	initiator   bool   // we sent the initiation that made this session
	created     time.Time
	sendCounter atomic.Uint64
	replay      replay.Filter
	recvMax     uint64      // greatest counter accepted
	received    atomic.Bool // whether any message was accepted (the control loop reads it)
}

// newSession builds a session from the two keys of a Noise Split; the initiator sends
// with k1 and the responder with k2 (PROTOCOL.md §3).
func newSession(suite cipherSuite, k1, k2 []byte, initiator bool, local, remote uint32, now time.Time) (*session, error) {
	sendKey, recvKey := k1, k2
	if !initiator {
		sendKey, recvKey = k2, k1
	}
	send, err := newAEAD(suite, sendKey)
	if err != nil {
		return nil, err
	}
	recv, err := newAEAD(suite, recvKey)
	if err != nil {
		return nil, err
	}
	return &session{send: send, recv: recv, suite: suite, localIndex: local, remoteIndex: remote,
		initiator: initiator, created: now}, nil
}

// reserveCounters takes n consecutive send counters and returns the first; ok is false
// once the session has reached its reject limit (PROTOCOL.md §5).
func (s *session) reserveCounters(n int) (first uint64, ok bool) {
	end := s.sendCounter.Add(uint64(n))
	first = end - uint64(n)
	return first, end <= rejectAfterPackets
}

// nonce fills the 12-byte AEAD nonce for a counter: 4 zero bytes, then the counter
// (PROTOCOL.md §4). The caller owns the array so that sealing does not allocate.
func putNonce(nonce *[12]byte, counter uint64) {
	binary.BigEndian.PutUint64(nonce[4:], counter)
}

// seal turns buf[dataHeaderSize:dataHeaderSize+n], an inner packet of n bytes (n may be
// 0), into a data message in place: it writes the header in front and the tag behind, so
// buf must have room for n + dataOverhead bytes. It returns the message.
func (s *session) seal(buf []byte, n int, flags byte, counter uint64, nonce *[12]byte) []byte {
	return s.sealTo(buf, buf[dataHeaderSize:dataHeaderSize+n], flags, counter, nonce)
}

// sealTo seals the inner packet pkt into dst, which must have room for len(pkt) +
// dataOverhead bytes and must not overlap pkt: the header first, then the ciphertext and
// the tag. Reading pkt and writing dst is the only pass over the data. It returns the
// message.
func (s *session) sealTo(dst, pkt []byte, flags byte, counter uint64, nonce *[12]byte) []byte {
	hdr := dst[:dataHeaderSize]
	hdr[offsetVersion] = protocolVersion
	hdr[offsetType] = messageData
	hdr[dataOffFlags] = flags
	hdr[dataOffFlags+1] = 0
	binary.BigEndian.PutUint32(hdr[dataOffReceiver:], s.remoteIndex)
	binary.BigEndian.PutUint64(hdr[dataOffCounter:], counter)
	putNonce(nonce, counter)
	return s.send.Seal(hdr, nonce[:], pkt, hdr)
}

// dataHeader is the clear part of a data message (PROTOCOL.md §4).
type dataHeader struct {
	flags    byte
	receiver uint32
	counter  uint64
}

// parseDataHeader checks the fixed parts of a data message (§4.1 step 1).
func parseDataHeader(msg []byte) (dataHeader, error) {
	if len(msg) < dataOverhead || msg[offsetVersion] != protocolVersion || msg[offsetType] != messageData ||
		msg[dataOffFlags]&^knownDataFlags != 0 {
		return dataHeader{}, errMalformed
	}
	return dataHeader{
		flags:    msg[dataOffFlags],
		receiver: binary.BigEndian.Uint32(msg[dataOffReceiver:]),
		counter:  binary.BigEndian.Uint64(msg[dataOffCounter:]),
	}, nil
}

// acceptCounter applies the replay window to the counter of a message that opened
// (§4.3) and reports whether it is new. Only the receiving goroutine may call it.
func (s *session) acceptCounter(counter uint64) bool {
	return s.replay.ValidateCounter(counter, rejectAfterPackets)
}

// open authenticates and decrypts a data message in place (§4.1 step 3) and returns the
// inner packet, which aliases msg. It does not consult the replay window: the caller does
// that after open succeeds, so that only authentic counters move it.
func (s *session) open(msg []byte, h dataHeader, nonce *[12]byte) ([]byte, error) {
	if h.counter >= rejectAfterPackets {
		return nil, errAuth
	}
	putNonce(nonce, h.counter)
	inner, err := s.recv.Open(msg[dataHeaderSize:dataHeaderSize], nonce[:], msg[dataHeaderSize:], msg[:dataHeaderSize])
	if err != nil {
		return nil, errAuth
	}
	return inner, nil
}
