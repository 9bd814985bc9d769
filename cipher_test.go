package main

import (
	"bytes"
	"encoding/hex"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// Data-message vectors from testdata/protocol-vectors.py (an implementation written from
// PROTOCOL.md alone): exchange A chooses ChaCha20-Poly1305, exchange B AES-256-GCM.
var dataVectors = []struct {
	name      string
	suite     cipherSuite
	fromInit  bool
	counter   uint64
	flags     byte
	inner     string
	wantHex   string
	initIndex uint32
	respIndex uint32
}{
	{"A.data1", cipherChaCha20Poly1305, true, 0, 0, katInner,
		"020300005566778800000000000000005fa5aa13b378503905b3fba43b7195cbdc4e230a3799d4187aeaa01a8b4db0dde263dfe2b4e9fdfcf8590562f2", 0x11223344, 0x55667788},
	{"A.data2", cipherChaCha20Poly1305, true, 1, flagPing, "",
		"020301005566778800000000000000014bf88963b568e5b7436b213252ecfce2", 0x11223344, 0x55667788},
	{"A.data3", cipherChaCha20Poly1305, false, 0, 0, katInner,
		"020300001122334400000000000000004c44864aaa39787ce9b4479c787a75d2ec4a44b8b1cbb7fc575a968aeeb8eb224afe7588b64b7cfdc7bdfd8403", 0x11223344, 0x55667788},
	{"B.data1", cipherAES256GCM, true, 0, 0, katInner,
		"020300005566778900000000000000004f9806441981e0ce702b5759673dae90bebb48711e198929b59634ea892fd520b161225dc498c1115e09146c45", 0x11223345, 0x55667789},
	{"B.data2", cipherAES256GCM, true, 1, flagPing, "",
		"02030100556677890000000000000001bcc9a9e372d0e4eb7f007c3d7b552d12", 0x11223345, 0x55667789},
	{"B.data3", cipherAES256GCM, false, 0, 0, katInner,
		"02030000112233450000000000000000854e37d6ddf85b2589cefad6986a1a647573574cdcc329440077159f433ad5a5e96fcef9e129aedc046a09b930", 0x11223345, 0x55667789},
}

// katInner is the inner packet of the vectors (used as given, whatever it holds).
const katInner = "45000021000040004001f56e0a0000010a00000208004d5168656c6c6f"

// katSessions runs the known-answer exchange with the given responder cipher and
// indices and returns the initiator's and responder's sessions.
func katSessions(t testing.TB, suite cipherSuite, initIndex, respIndex uint32, tsOffset time.Duration) (si, sr *session) {
	t.Helper()
	ini, res := katExchanges(t)
	ini.random, res.random = &countingReader{initIndex}, &countingReader{respIndex}
	ini.wallClock = func() time.Time { return katTimestamp.Add(tsOffset) }
	res.cfg.ciphers = suite
	return handshake(t, ini, res, fixedEphemeral(t, katInitEphemeral), fixedEphemeral(t, katRespEphemeral))
}

func TestDataKnownAnswers(t *testing.T) {
	for _, v := range dataVectors {
		t.Run(v.name, func(t *testing.T) {
			offset := time.Duration(v.initIndex - 0x11223344) // B's timestamp is 1 ns later
			si, sr := katSessions(t, v.suite, v.initIndex, v.respIndex, offset)
			sender, receiver := si, sr
			if !v.fromInit {
				sender, receiver = sr, si
			}
			inner := unhex(t, v.inner)
			buf := make([]byte, dataHeaderSize+len(inner)+tagSize)
			copy(buf[dataHeaderSize:], inner)
			var nonce [12]byte
			msg := sender.seal(buf, len(inner), v.flags, v.counter, &nonce)
			if got := hex.EncodeToString(msg); got != v.wantHex {
				t.Fatalf("sealed:\n got %s\nwant %s", got, v.wantHex)
			}
			h, err := parseDataHeader(msg)
			if err != nil || h.flags != v.flags || h.counter != v.counter || h.receiver != receiver.localIndex {
				t.Fatalf("header %+v, %v", h, err)
			}
			got, err := receiver.open(msg, h, &nonce)
			if err != nil || !bytes.Equal(got, inner) {
				t.Fatalf("open: %x, %v", got, err)
			}
			if &got[0:1][0] != &msg[dataHeaderSize : dataHeaderSize+1][0] && len(inner) > 0 {
				t.Fatal("open did not decrypt in place")
			}
		})
	}
}

func TestDataTamperingDetected(t *testing.T) {
	si, sr := katSessions(t, cipherAES256GCM, 0x11223344, 0x55667788, 0)
	inner := unhex(t, katInner)
	buf := make([]byte, dataHeaderSize+len(inner)+tagSize)
	var nonce [12]byte
	for bit := 0; bit < len(buf)*8; bit++ {
		copy(buf[dataHeaderSize:], inner)
		msg := si.seal(buf, len(inner), 0, 7, &nonce)
		msg[bit/8] ^= 1 << (bit % 8)
		h, err := parseDataHeader(msg)
		if err != nil {
			continue // a changed version, type or flag is refused before decryption
		}
		if h.receiver != sr.localIndex {
			continue // would not find the session
		}
		if _, err := sr.open(msg, h, &nonce); err == nil {
			t.Fatalf("message with bit %d flipped opened", bit)
		}
	}
}

func TestParseDataHeaderRefuses(t *testing.T) {
	good := make([]byte, dataOverhead)
	good[offsetVersion], good[offsetType] = protocolVersion, messageData
	if _, err := parseDataHeader(good); err != nil {
		t.Fatalf("minimal keepalive refused: %v", err)
	}
	for name, mutate := range map[string]func([]byte) []byte{
		"short":        func(b []byte) []byte { return b[:dataOverhead-1] },
		"version 1":    func(b []byte) []byte { b[offsetVersion] = protocolVersion1; return b },
		"version 3":    func(b []byte) []byte { b[offsetVersion] = protocolVersion + 1; return b },
		"initiation":   func(b []byte) []byte { b[offsetType] = messageInitiation; return b },
		"unknown flag": func(b []byte) []byte { b[dataOffFlags] = 0x80; return b },
		"IPv4 packet":  func(b []byte) []byte { b[0] = 0x45; return b },
	} {
		if _, err := parseDataHeader(mutate(bytes.Clone(good))); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

// TestReplayWindow covers the edges of §4.3 on a session, as the receive path uses it.
func TestReplayWindow(t *testing.T) {
	const window = 8128
	s := &session{}
	steps := []struct {
		counter uint64
		want    bool
	}{
		{0, true}, {0, false}, {1, true}, {1, false},
		{window + 10, true}, // jump ahead
		{10, true},          // exactly the window behind the greatest: still accepted once
		{10, false},
		{9, false}, // one more than the window behind
		{window + 9, true}, {window + 9, false},
		{3 * window, true}, {window + 11, false}, // left behind by a second jump
		{3*window - 1, true},
		{rejectAfterPackets - 1, true},
		{rejectAfterPackets, false}, // reject limit
		{rejectAfterPackets - 1, false},
	}
	for i, st := range steps {
		if got := s.acceptCounter(st.counter); got != st.want {
			t.Fatalf("step %d: counter %d accepted = %v, want %v", i, st.counter, got, st.want)
		}
	}
}

func TestSessionCountersAndReuse(t *testing.T) {
	si, _ := katSessions(t, cipherChaCha20Poly1305, 0x11223344, 0x55667788, 0)
	first, ok := si.reserveCounters(5)
	if first != 0 || !ok {
		t.Fatalf("first batch: %d %v", first, ok)
	}
	if first, _ = si.reserveCounters(3); first != 5 {
		t.Fatalf("second batch starts at %d, want 5", first)
	}
	si.sendCounter.Store(rejectAfterPackets - 2)
	if _, ok := si.reserveCounters(2); !ok {
		t.Fatal("last two counters refused")
	}
	if _, ok := si.reserveCounters(1); ok {
		t.Fatal("a counter at the reject limit was handed out")
	}
}

func TestExchangePayloadRoundTrip(t *testing.T) {
	for _, p := range []exchangePayload{
		{ciphers: knownCiphers, mtu: 1440, addr: netip.MustParseAddr("10.1.2.3"), expected: netip.MustParseAddr("10.1.2.4")},
		{ciphers: cipherAES256GCM, mtu: 1280, addr: netip.MustParseAddr("fd00::1")},
	} {
		got, err := parseExchangePayload(p.marshal())
		if err != nil || got != p {
			t.Errorf("round trip of %+v: %+v, %v", p, got, err)
		}
	}
}

// FuzzDataMessage: no input panics the parser or the opener; what opens is exactly what
// sealing its plaintext again produces.
func FuzzDataMessage(f *testing.F) {
	si, sr := katSessions(f, cipherChaCha20Poly1305, 0x11223344, 0x55667788, 0)
	for _, v := range dataVectors[:2] {
		f.Add(unhex(f, v.wantHex))
	}
	f.Add([]byte{1, 3, 0, 0, 0x55, 0x66, 0x77, 0x88})
	f.Add(bytes.Repeat([]byte{1}, 64))
	f.Fuzz(func(t *testing.T, msg []byte) {
		h, err := parseDataHeader(msg)
		if err != nil {
			return
		}
		var nonce [12]byte
		work := bytes.Clone(msg)
		inner, err := sr.open(work, h, &nonce)
		if err != nil {
			return
		}
		buf := make([]byte, dataHeaderSize+len(inner)+tagSize)
		copy(buf[dataHeaderSize:], inner)
		if again := si.seal(buf, len(inner), h.flags, h.counter, &nonce); !bytes.Equal(again, msg) {
			t.Fatalf("opened %x, but sealing its plaintext gives %x", msg, again)
		}
	})
}

// TestIndependentImplementation runs testdata/protocol-vectors.py, a second
// implementation of PROTOCOL.md written from the document alone, and checks that it
// still prints the vectors the Go tests hold. It needs Python 3 with the cryptography
// package; in CI (CI=true) its absence is a failure.
func TestIndependentImplementation(t *testing.T) {
	var out []byte
	for _, python := range []string{"python3", "/usr/bin/python3"} {
		if exec.Command(python, "-c", "import cryptography").Run() != nil {
			continue
		}
		var err error
		if out, err = exec.Command(python, "testdata/protocol-vectors.py").Output(); err != nil {
			t.Fatalf("%s testdata/protocol-vectors.py: %v", python, err)
		}
		break
	}
	if out == nil {
		if os.Getenv("CI") == "true" {
			t.Fatal("no python3 with the cryptography package, and in CI this test must run")
		}
		t.Skip("needs python3 with the cryptography package; skipped")
	}
	printed := map[string]string{}
	for _, line := range strings.Split(string(out), "\n") {
		if name, value, ok := strings.Cut(line, " = "); ok {
			printed[name] = value
		}
	}
	want := map[string]string{"psk": katPSK, "mackey": katMACKey, "kem.ek": katKEMKey,
		"A.initiation.0": katInitiation[0], "A.initiation.1": katInitiation[1],
		"A.response.0": katResponse[0], "A.response.1": katResponse[1], "A.k1": katK1, "A.k2": katK2,
		"v1.initiation": katVersion1Initiation}
	for _, v := range dataVectors {
		want[v.name] = v.wantHex
	}
	for name, value := range want {
		if printed[name] != value {
			t.Errorf("%s: the Python implementation prints %q, the Go tests hold %q", name, printed[name], value)
		}
	}
}
