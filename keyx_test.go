package main

import (
	"bytes"
	"crypto/ecdh"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"net/netip"
	"os"
	"testing"
	"time"

	"golang.org/x/crypto/chacha20poly1305"
)

func unhex(t testing.TB, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(s)
	if err != nil {
		t.Fatalf("bad hex %q: %v", s, err)
	}
	return b
}

func fixedEphemeral(t testing.TB, hexKey string) *ecdh.PrivateKey {
	t.Helper()
	k, err := ecdh.X25519().NewPrivateKey(unhex(t, hexKey))
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// TestNoiseVector checks the Noise layer against the published cacophony vector for
// Noise_NNpsk0_25519_ChaChaPoly_SHA256 (testdata/, taken from mcginty/snow
// tests/vectors/cacophony.txt at aabed3159deec0a0dfe3d5601c43322d84700c94).
func TestNoiseVector(t *testing.T) {
	raw, err := os.ReadFile("testdata/noise-NNpsk0-25519-ChaChaPoly-SHA256.json")
	if err != nil {
		t.Fatal(err)
	}
	var vectors []struct {
		ProtocolName  string   `json:"protocol_name"`
		InitPrologue  string   `json:"init_prologue"`
		InitPSKs      []string `json:"init_psks"`
		InitEphemeral string   `json:"init_ephemeral"`
		RespEphemeral string   `json:"resp_ephemeral"`
		HandshakeHash string   `json:"handshake_hash"`
		Messages      []struct {
			Payload    string `json:"payload"`
			Ciphertext string `json:"ciphertext"`
		} `json:"messages"`
	}
	if err := json.Unmarshal(raw, &vectors); err != nil {
		t.Fatal(err)
	}
	if len(vectors) == 0 {
		t.Fatal("no vectors")
	}
	for _, v := range vectors {
		if v.ProtocolName != noiseProtocolName {
			t.Fatalf("vector for %q, want %q", v.ProtocolName, noiseProtocolName)
		}
		psk := [noiseKeySize]byte(unhex(t, v.InitPSKs[0]))
		prologue := unhex(t, v.InitPrologue)
		ini, err := newNoiseHandshake(prologue, psk, fixedEphemeral(t, v.InitEphemeral))
		if err != nil {
			t.Fatal(err)
		}
		res, err := newNoiseHandshake(prologue, psk, fixedEphemeral(t, v.RespEphemeral))
		if err != nil {
			t.Fatal(err)
		}
		m0, m1 := v.Messages[0], v.Messages[1]
		if got := ini.writeMessage1(nil, unhex(t, m0.Payload)); hex.EncodeToString(got) != m0.Ciphertext {
			t.Fatalf("message 1:\n got %x\nwant %s", got, m0.Ciphertext)
		}
		if p, err := res.readMessage1(unhex(t, m0.Ciphertext)); err != nil || hex.EncodeToString(p) != m0.Payload {
			t.Fatalf("read message 1: %x, %v", p, err)
		}
		got, err := res.writeMessage2(nil, unhex(t, m1.Payload))
		if err != nil || hex.EncodeToString(got) != m1.Ciphertext {
			t.Fatalf("message 2:\n got %x (%v)\nwant %s", got, err, m1.Ciphertext)
		}
		if p, err := ini.readMessage2(unhex(t, m1.Ciphertext)); err != nil || hex.EncodeToString(p) != m1.Payload {
			t.Fatalf("read message 2: %x, %v", p, err)
		}
		for _, h := range [][32]byte{ini.h, res.h} {
			if hex.EncodeToString(h[:]) != v.HandshakeHash {
				t.Fatalf("handshake hash %x, want %s", h, v.HandshakeHash)
			}
		}
		// Transport messages alternate, initiator first, each direction counting from 0.
		k1, k2 := ini.split()
		if rk1, rk2 := res.split(); rk1 != k1 || rk2 != k2 {
			t.Fatal("split keys differ between initiator and responder")
		}
		var n [2]uint64
		for i, m := range v.Messages[2:] {
			key := k1
			if i%2 == 1 {
				key = k2
			}
			aead, _ := chacha20poly1305.New(key[:])
			var nonce [12]byte
			binary.LittleEndian.PutUint64(nonce[4:], n[i%2])
			n[i%2]++
			if got := aead.Seal(nil, nonce[:], unhex(t, m.Payload), nil); hex.EncodeToString(got) != m.Ciphertext {
				t.Fatalf("transport message %d:\n got %x\nwant %s", i, got, m.Ciphertext)
			}
		}
	}
}

// Known answers for ciped's own layer (PROTOCOL.md §2, §3), made with the fixed inputs
// below and checked by hand against an independent implementation of PROTOCOL.md
// (testdata/protocol-vectors.py, run with Python's cryptography package).
var (
	katLinkKey       = "000102030405060708090a0b0c0d0e0f"
	katPSK           = "80b3fa1f57b00618d9ac9ea9f8a77abe237a881086e461ef3bcae652f144b1e9"
	katMACKey        = "06efd78569dfa62db487c7ce220e74889aa9c23785dbb8876ffde80cb0879ef4"
	katInitEphemeral = "893e28b9dc6ca8d611ab664754b8ceb7bac5117349a4439a6b0569da977c464a"
	katRespEphemeral = "bbdb4cdbd309f1a1f2e1456967fe288cadd6f712d65dc7b7793d5e63da6b375b"
	katTimestamp     = time.Unix(1795000000, 123456789) // 2026-11-18
	katInitiation    = "010100001122334418e91efd632f4d15ca35def5ae56cec33dc2036731ab14896bc4c75dbb07a61f879f8e3afa4c794442310f5bdee8dd6e3fcc8302737ee61a377aa86246dc63cde6296127d9a112b487c034574253c103bb59bfecdef1015f89cf9fa2482155e0f1a1cb8f7160eb6a06fb9a4f"
	katResponse      = "01020000556677881122334495ebc60d2b1fa672c1f46a8aa265ef51bfe38e7ccb39ec5be34069f1448088431545ed28e2418d79a449a9fc588df14d0da9ebf0d7388db377f0a303d265b39990b674feff55e9d3d62c9c4a591cba504434e15c963ac4649c46e28556b20e449fccf90e"
)

// countingReader yields 0x11223344, 0x11223345, ... as 4-byte indices.
type countingReader struct{ next uint32 }

func (r *countingReader) Read(b []byte) (int, error) {
	for i := 0; i+4 <= len(b); i += 4 {
		binary.BigEndian.PutUint32(b[i:], r.next)
		r.next++
	}
	return len(b), nil
}

func katExchanges(t testing.TB) (ini, res *keyExchange) {
	secrets := deriveLinkSecrets([linkKeySize]byte(unhex(t, katLinkKey)))
	clock := func() time.Time { return katTimestamp }
	ini = &keyExchange{cfg: exchangeConfig{secrets: secrets, ciphers: knownCiphers, mtu: 1440,
		addr: netip.MustParseAddr("10.0.0.1"), expected: netip.MustParseAddr("10.0.0.2")},
		wallClock: clock, random: &countingReader{0x11223344}}
	res = &keyExchange{cfg: exchangeConfig{secrets: secrets, ciphers: cipherChaCha20Poly1305, mtu: 1420,
		addr: netip.MustParseAddr("10.0.0.2")},
		wallClock: clock, random: &countingReader{0x55667788}}
	return ini, res
}

func TestKeyScheduleKnownAnswers(t *testing.T) {
	s := deriveLinkSecrets([linkKeySize]byte(unhex(t, katLinkKey)))
	if got := hex.EncodeToString(s.psk[:]); got != katPSK {
		t.Errorf("psk = %s, want %s", got, katPSK)
	}
	if got := hex.EncodeToString(s.macKey[:]); got != katMACKey {
		t.Errorf("macKey = %s, want %s", got, katMACKey)
	}
	ini, res := katExchanges(t)
	now := time.Now()
	m1, err := ini.initiateWith(now, fixedEphemeral(t, katInitEphemeral))
	if err != nil {
		t.Fatal(err)
	}
	if got := hex.EncodeToString(m1); got != katInitiation {
		t.Errorf("initiation:\n got %s\nwant %s", got, katInitiation)
	}
	m2, r, err := res.consumeInitiationWith(m1, now, fixedEphemeral(t, katRespEphemeral))
	if err != nil {
		t.Fatal(err)
	}
	if got := hex.EncodeToString(m2); got != katResponse {
		t.Errorf("response:\n got %s\nwant %s", got, katResponse)
	}
	if r.peer.addr != netip.MustParseAddr("10.0.0.1") || r.peer.expected != netip.MustParseAddr("10.0.0.2") || r.peer.mtu != 1440 {
		t.Errorf("responder learned %+v", r.peer)
	}
	ri, err := ini.consumeResponse(m2, now)
	if err != nil {
		t.Fatal(err)
	}
	if ri.session.suite != cipherChaCha20Poly1305 || r.session.suite != cipherChaCha20Poly1305 {
		t.Errorf("suites %v/%v, want ChaCha20-Poly1305 (the responder offers nothing else)", ri.session.suite, r.session.suite)
	}
	if ri.session.localIndex != 0x11223344 || ri.session.remoteIndex != 0x55667788 ||
		r.session.localIndex != 0x55667788 || r.session.remoteIndex != 0x11223344 {
		t.Errorf("indices %x/%x and %x/%x", ri.session.localIndex, ri.session.remoteIndex, r.session.localIndex, r.session.remoteIndex)
	}
}

// handshake runs a full exchange between two fresh sides and returns their sessions;
// with two fixed ephemeral keys (initiator's, responder's) the result is deterministic.
func handshake(t testing.TB, ini, res *keyExchange, ephemerals ...*ecdh.PrivateKey) (si, sr *session) {
	t.Helper()
	var ei, er *ecdh.PrivateKey
	if len(ephemerals) == 2 {
		ei, er = ephemerals[0], ephemerals[1]
	}
	now := time.Now()
	m1, err := ini.initiateWith(now, ei)
	if err != nil {
		t.Fatal(err)
	}
	m2, r, err := res.consumeInitiationWith(m1, now, er)
	if err != nil {
		t.Fatal(err)
	}
	ri, err := ini.consumeResponse(m2, now)
	if err != nil {
		t.Fatal(err)
	}
	return ri.session, r.session
}

func TestExchangeRefusals(t *testing.T) {
	realClock := func() time.Time { return time.Now() }
	newPair := func() (*keyExchange, *keyExchange) {
		ini, res := katExchanges(t)
		ini.wallClock, res.wallClock = realClock, realClock
		return ini, res
	}
	now := time.Now()

	t.Run("replayed initiation", func(t *testing.T) {
		ini, res := newPair()
		m1, _ := ini.initiate(now)
		if _, _, err := res.consumeInitiation(m1, now); err != nil {
			t.Fatal(err)
		}
		if _, _, err := res.consumeInitiation(m1, now); !errors.Is(err, errStale) {
			t.Fatalf("replay: %v, want errStale", err)
		}
	})
	t.Run("older initiation after a newer one", func(t *testing.T) {
		ini, res := newPair()
		old, _ := ini.initiate(now)
		old = append([]byte(nil), old...)
		m1, _ := ini.initiate(now)
		if _, _, err := res.consumeInitiation(m1, now); err != nil {
			t.Fatal(err)
		}
		if _, _, err := res.consumeInitiation(old, now); !errors.Is(err, errStale) {
			t.Fatalf("older: %v, want errStale", err)
		}
	})
	t.Run("replayed response", func(t *testing.T) {
		ini, res := newPair()
		m1, _ := ini.initiate(now)
		m2, _, err := res.consumeInitiation(m1, now)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := ini.consumeResponse(m2, now); err != nil {
			t.Fatal(err)
		}
		if _, err := ini.consumeResponse(m2, now); !errors.Is(err, errNotWaiting) {
			t.Fatalf("replayed response: %v, want errNotWaiting", err)
		}
	})
	t.Run("wrong key", func(t *testing.T) {
		ini, res := newPair()
		res.cfg.secrets = deriveLinkSecrets([linkKeySize]byte{1})
		m1, _ := ini.initiate(now)
		if _, _, err := res.consumeInitiation(m1, now); !errors.Is(err, errAuth) {
			t.Fatalf("wrong key: %v, want errAuth", err)
		}
	})
	t.Run("every flipped bit", func(t *testing.T) {
		ini, res := newPair()
		m1, _ := ini.initiate(now)
		for i := 0; i < len(m1)*8; i++ {
			bad := bytes.Clone(m1)
			bad[i/8] ^= 1 << (i % 8)
			if _, _, err := res.consumeInitiation(bad, now); err == nil {
				t.Fatalf("initiation with bit %d flipped accepted", i)
			}
		}
		m2, _, err := res.consumeInitiation(m1, now)
		if err != nil {
			t.Fatal(err)
		}
		for i := 0; i < len(m2)*8; i++ {
			bad := bytes.Clone(m2)
			bad[i/8] ^= 1 << (i % 8)
			if _, err := ini.consumeResponse(bad, now); err == nil {
				t.Fatalf("response with bit %d flipped accepted", i)
			}
		}
		if _, err := ini.consumeResponse(m2, now); err != nil {
			t.Fatalf("the genuine response after the forgeries: %v", err)
		}
	})
	t.Run("reflected initiation", func(t *testing.T) {
		ini, _ := newPair()
		m1, _ := ini.initiate(now)
		if _, _, err := ini.consumeInitiation(m1, now); !errors.Is(err, errReflected) {
			t.Fatalf("reflection: %v, want errReflected", err)
		}
	})
	t.Run("ptpaddr mismatch", func(t *testing.T) {
		ini, res := newPair()
		ini.cfg.expected = netip.MustParseAddr("10.0.0.9")
		m1, _ := ini.initiate(now)
		if _, _, err := res.consumeInitiation(m1, now); err == nil {
			t.Fatal("an initiator expecting another address was answered")
		}
	})
	t.Run("tokxts", func(t *testing.T) {
		ini, res := newPair()
		res.cfg.tokxts = 5 * time.Second
		ini.wallClock = func() time.Time { return time.Now().Add(-time.Minute) }
		m1, _ := ini.initiate(now)
		if _, _, err := res.consumeInitiation(m1, now); !errors.Is(err, errSkew) {
			t.Fatalf("skewed: %v, want errSkew", err)
		}
		ini.wallClock = func() time.Time { return time.Now().Add(3 * time.Second) }
		m1, _ = ini.initiate(now)
		if _, _, err := res.consumeInitiation(m1, now); err != nil {
			t.Fatalf("within window: %v", err)
		}
	})
	t.Run("no common cipher", func(t *testing.T) {
		ini, res := newPair()
		ini.cfg.ciphers, res.cfg.ciphers = cipherAES256GCM, cipherChaCha20Poly1305
		m1, _ := ini.initiate(now)
		if _, _, err := res.consumeInitiation(m1, now); !errors.Is(err, errNoCommonCipher) {
			t.Fatalf("no common cipher: %v", err)
		}
	})
	t.Run("collision", func(t *testing.T) {
		a, b := newPair()
		ma, _ := a.initiate(now)
		ma = bytes.Clone(ma)
		mb, _ := b.initiate(now)
		mb = bytes.Clone(mb)
		_, ra, errA := a.consumeInitiation(mb, now)
		_, rb, errB := b.consumeInitiation(ma, now)
		if (errA == nil) == (errB == nil) {
			t.Fatalf("exactly one side must answer: a %v, b %v", errA, errB)
		}
		if errA != nil && (!errors.Is(errA, errCollisionWon) || rb == nil || b.pending != nil || a.pending == nil) {
			t.Fatalf("a: %v", errA)
		}
		if errB != nil && (!errors.Is(errB, errCollisionWon) || ra == nil || a.pending != nil || b.pending == nil) {
			t.Fatalf("b: %v", errB)
		}
		// The winner sends its initiation again; the loser, who answered the first copy,
		// refuses the second as a duplicate (expected, not reported), and the winner does
		// the same with a copy of the loser's. A replay of an initiation that met no
		// collision stays a replay (errStale, above).
		winner, loser, wins, loses := a, b, ma, mb
		if errB != nil {
			winner, loser, wins, loses = b, a, mb, ma
		}
		if _, _, err := loser.consumeInitiation(wins, now); !errors.Is(err, errDuplicate) {
			t.Errorf("the loser given the winner's initiation again: %v, want errDuplicate", err)
		}
		if _, _, err := winner.consumeInitiation(loses, now); !errors.Is(err, errDuplicate) {
			t.Errorf("the winner given the loser's initiation again: %v, want errDuplicate", err)
		}
	})
}

func TestExchangePicksAESOnlyWhenBothOffer(t *testing.T) {
	for _, c := range []struct {
		ini, res, want cipherSuite
	}{
		{knownCiphers, knownCiphers, cipherAES256GCM},
		{knownCiphers, cipherChaCha20Poly1305, cipherChaCha20Poly1305},
		{cipherChaCha20Poly1305, knownCiphers, cipherChaCha20Poly1305},
		{cipherAES256GCM, cipherAES256GCM, cipherAES256GCM},
	} {
		ini, res := katExchanges(t)
		ini.wallClock, res.wallClock = time.Now, time.Now
		ini.cfg.ciphers, res.cfg.ciphers = c.ini, c.res
		si, sr := handshake(t, ini, res)
		if si.suite != c.want || sr.suite != c.want {
			t.Errorf("offer %v, accept %v: got %v/%v, want %v", c.ini, c.res, si.suite, sr.suite, c.want)
		}
	}
}

// FuzzExchangeMessages: no input panics either side of the key exchange, and only the
// genuine messages are accepted.
func FuzzExchangeMessages(f *testing.F) {
	ini, res := katExchanges(f)
	now := time.Now()
	m1, _ := ini.initiateWith(now, fixedEphemeral(f, katInitEphemeral))
	m1 = bytes.Clone(m1)
	m2, _, _ := res.consumeInitiationWith(m1, now, fixedEphemeral(f, katRespEphemeral))
	f.Add(m1)
	f.Add(m2)
	f.Add(m1[:50])
	f.Fuzz(func(t *testing.T, msg []byte) {
		ini, res := katExchanges(t)
		if _, err := ini.initiateWith(now, fixedEphemeral(t, katInitEphemeral)); err != nil {
			t.Fatal(err)
		}
		if _, r, err := res.consumeInitiation(msg, now); err == nil && (!bytes.Equal(msg, m1) || r.session == nil) {
			t.Fatalf("initiation %x accepted", msg)
		}
		if r, err := ini.consumeResponse(msg, now); err == nil && (!bytes.Equal(msg, m2) || r.session == nil) {
			t.Fatalf("response %x accepted", msg)
		}
	})
}

// TestKeyRotation: during a rotation a responder holds the new key and the old one: it
// accepts an initiation under either (and answers under the same), a collision with an
// initiation under the old key goes to the peer that still has it, an initiator checks
// a response under the key it initiated with (even if its key changed meanwhile), and a
// forgery is refused. The unknown-session message is accepted under either key.
func TestKeyRotation(t *testing.T) {
	oldKey, newKey := deriveLinkSecrets([linkKeySize]byte{1}), deriveLinkSecrets([linkKeySize]byte{2})
	side := func(addr, peer string, secrets linkSecrets, old *linkSecrets) *keyExchange {
		return &keyExchange{cfg: exchangeConfig{secrets: secrets, old: old, ciphers: knownCiphers, mtu: 1440,
			addr: netip.MustParseAddr(addr), expected: netip.MustParseAddr(peer)}, wallClock: time.Now}
	}
	now := time.Now()
	rotating := side("10.0.0.2", "10.0.0.1", newKey, &oldKey)
	for _, initiator := range []*keyExchange{side("10.0.0.1", "10.0.0.2", oldKey, nil), side("10.0.0.1", "10.0.0.2", newKey, nil)} {
		m1, _ := initiator.initiate(now)
		m2, _, err := rotating.consumeInitiation(m1, now)
		if err != nil {
			t.Fatalf("an initiation under the %s key: %v", map[bool]string{true: "old", false: "new"}[initiator.cfg.secrets == oldKey], err)
		}
		if _, err := initiator.consumeResponse(m2, now); err != nil {
			t.Fatalf("the response to it: %v", err)
		}
	}
	// A peer that still has only the old key cannot take an initiation under the new one.
	behind := side("10.0.0.1", "10.0.0.2", oldKey, nil)
	m1, _ := rotating.initiate(now)
	if _, _, err := behind.consumeInitiation(m1, now); !errors.Is(err, errAuth) {
		t.Fatalf("an initiation under the new key at a peer without it: %v", err)
	}
	// Collision: the rotating end's pending initiation (new key) cannot win against one
	// under the old key, whatever the ephemeral keys say: it answers that one.
	for range 8 {
		behind := side("10.0.0.1", "10.0.0.2", oldKey, nil)
		rotating.initiate(now)
		theirs, _ := behind.initiate(now)
		if _, _, err := rotating.consumeInitiation(theirs, now); err != nil {
			t.Fatalf("a colliding initiation under the old key: %v", err)
		}
	}
	// The initiator's key changes while its initiation is under way.
	ini, res := side("10.0.0.1", "10.0.0.2", oldKey, nil), side("10.0.0.2", "10.0.0.1", oldKey, nil)
	m1, _ = ini.initiate(now)
	m2, _, err := res.consumeInitiation(m1, now)
	if err != nil {
		t.Fatal(err)
	}
	ini.cfg.secrets, ini.cfg.old = newKey, &oldKey // a reload
	if _, err := ini.consumeResponse(m2, now); err != nil {
		t.Fatalf("a response under the key the initiation was made with: %v", err)
	}
	// Forgeries: no key.
	forged, _ := side("10.0.0.1", "10.0.0.2", deriveLinkSecrets([linkKeySize]byte{3}), nil).initiate(now)
	if _, _, err := rotating.consumeInitiation(forged, now); !errors.Is(err, errAuth) {
		t.Fatalf("an initiation under a third key: %v", err)
	}
	for _, k := range []*linkSecrets{&oldKey, &newKey} {
		u := (&keyExchange{cfg: exchangeConfig{secrets: *k}}).unknownSession(7, 9)
		if r, c, err := rotating.consumeUnknownSession(u); err != nil || r != 7 || c != 9 {
			t.Fatalf("an unknown-session message: %d %d %v", r, c, err)
		}
	}
}
