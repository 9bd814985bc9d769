#!/usr/bin/env python3
"""Independent implementation of the ciped wire protocol v1 message construction,
written from PROTOCOL.md alone, printing known-answer vectors.

Needs Python 3 and the `cryptography` package. Prints `name = hex` lines on stdout and
exits non-zero if any self-check fails.

What is implemented (section numbers refer to PROTOCOL.md):
  §2    psk / macKey derivation
  §3    Noise_NNpsk0_25519_ChaChaPoly_SHA256 (Noise rev 34), prologue "ciped v1" || init[0:16]
  §3.1  initiation (116 bytes), §3.2 response (112 bytes), §3.3 exchange payload (36 bytes)
  §3.4  the receive-side checks that can be made on a single exchange
  §4    data messages under ChaCha20-Poly1305 or AES-256-GCM

Self-checks:
  * the Noise layer against the published cacophony vector for
    Noise_NNpsk0_25519_ChaChaPoly_SHA256 (handshake and transport messages);
  * each initiation is parsed responder-side and each response initiator-side
    (MAC, Noise decryption, payload fields, cipher choice), both sides' split keys agree;
  * each data message is opened again by the receiving side, and tampering is detected.
"""

import hashlib
import hmac
import ipaddress
import struct
import sys

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives import serialization
from cryptography.exceptions import InvalidTag

# ---------------------------------------------------------------------------------------
# Constants (§1, §3, §4, §7)

VERSION = 1
TYPE_INITIATION = 1
TYPE_RESPONSE = 2
TYPE_DATA = 3

INITIATION_SIZE = 116
RESPONSE_SIZE = 112
DATA_HEADER_SIZE = 16
TAG_SIZE = 16
PAYLOAD_SIZE = 36
MAC_SIZE = 16

CIPHER_CHACHA = 0x01
CIPHER_AESGCM = 0x02

FLAG_PING = 0x01
FLAG_GOODBYE = 0x02
KNOWN_FLAGS = FLAG_PING | FLAG_GOODBYE

NOISE_NAME = b"Noise_NNpsk0_25519_ChaChaPoly_SHA256"
PROLOGUE_PREFIX = b"ciped v1"


class ProtocolError(Exception):
    pass


# ---------------------------------------------------------------------------------------
# Primitives

def hmac256(key, msg):
    return hmac.new(key, msg, hashlib.sha256).digest()


def x25519_priv(raw):
    return X25519PrivateKey.from_private_bytes(raw)


def x25519_pub(priv):
    return priv.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def x25519_dh(priv, pub_raw):
    return priv.exchange(X25519PublicKey.from_public_bytes(pub_raw))


# ---------------------------------------------------------------------------------------
# §2: keys derived from the link key

def derive_keys(link_key):
    assert len(link_key) == 16
    psk = hmac256(link_key, b"ciped v1 psk")
    mac_key = hmac256(link_key, b"ciped v1 mac")
    return psk, mac_key


# ---------------------------------------------------------------------------------------
# Noise (revision 34), specialised to NNpsk0 / 25519 / ChaChaPoly / SHA256

def noise_hkdf(ck, ikm, n):
    temp = hmac256(ck, ikm)
    out1 = hmac256(temp, b"\x01")
    out2 = hmac256(temp, out1 + b"\x02")
    if n == 2:
        return out1, out2
    out3 = hmac256(temp, out2 + b"\x03")
    return out1, out2, out3


class CipherState:
    """Noise CipherState with ChaChaPoly: nonce = 4 zero bytes || 64-bit little-endian n."""

    def __init__(self, k=None):
        self.k = k
        self.n = 0

    def _nonce(self):
        return b"\x00" * 4 + struct.pack("<Q", self.n)

    def encrypt_with_ad(self, ad, pt):
        if self.k is None:
            return pt
        ct = ChaCha20Poly1305(self.k).encrypt(self._nonce(), pt, ad)
        self.n += 1
        return ct

    def decrypt_with_ad(self, ad, ct):
        if self.k is None:
            return ct
        pt = ChaCha20Poly1305(self.k).decrypt(self._nonce(), ct, ad)  # raises InvalidTag
        self.n += 1
        return pt


class NNpsk0:
    """One side of a Noise_NNpsk0 handshake:   -> psk, e   <- e, ee"""

    def __init__(self, prologue, psk):
        assert len(psk) == 32
        if len(NOISE_NAME) <= 32:
            self.h = NOISE_NAME + b"\x00" * (32 - len(NOISE_NAME))
        else:
            self.h = hashlib.sha256(NOISE_NAME).digest()
        self.ck = self.h
        self.cs = CipherState()
        self.psk = psk
        self.e = None
        self.re = None
        self.mix_hash(prologue)

    def mix_hash(self, data):
        self.h = hashlib.sha256(self.h + data).digest()

    def mix_key(self, ikm):
        self.ck, temp_k = noise_hkdf(self.ck, ikm, 2)
        self.cs = CipherState(temp_k[:32])

    def mix_key_and_hash(self, ikm):
        self.ck, temp_h, temp_k = noise_hkdf(self.ck, ikm, 3)
        self.mix_hash(temp_h)
        self.cs = CipherState(temp_k[:32])

    def encrypt_and_hash(self, pt):
        ct = self.cs.encrypt_with_ad(self.h, pt)
        self.mix_hash(ct)
        return ct

    def decrypt_and_hash(self, ct):
        pt = self.cs.decrypt_with_ad(self.h, ct)
        self.mix_hash(ct)
        return pt

    # message 1, initiator: psk, e, payload
    def write_message_1(self, e_priv_raw, payload):
        self.mix_key_and_hash(self.psk)                 # psk
        self.e = x25519_priv(e_priv_raw)                # e
        e_pub = x25519_pub(self.e)
        self.mix_hash(e_pub)
        self.mix_key(e_pub)                             # psk handshakes: MixKey(e.public_key)
        return e_pub + self.encrypt_and_hash(payload)

    # message 1, responder
    def read_message_1(self, msg):
        self.mix_key_and_hash(self.psk)
        self.re = msg[:32]
        self.mix_hash(self.re)
        self.mix_key(self.re)
        return self.decrypt_and_hash(msg[32:])

    # message 2, responder: e, ee, payload
    def write_message_2(self, e_priv_raw, payload):
        self.e = x25519_priv(e_priv_raw)
        e_pub = x25519_pub(self.e)
        self.mix_hash(e_pub)
        self.mix_key(e_pub)
        self.mix_key(x25519_dh(self.e, self.re))        # ee
        return e_pub + self.encrypt_and_hash(payload)

    # message 2, initiator
    def read_message_2(self, msg):
        self.re = msg[:32]
        self.mix_hash(self.re)
        self.mix_key(self.re)
        self.mix_key(x25519_dh(self.e, self.re))
        return self.decrypt_and_hash(msg[32:])

    def split(self):
        k1, k2 = noise_hkdf(self.ck, b"", 2)
        return k1[:32], k2[:32]


def noise_selftest():
    """Published cacophony vector for Noise_NNpsk0_25519_ChaChaPoly_SHA256."""
    prologue = bytes.fromhex("4a6f686e2047616c74")  # "John Galt"
    psk = bytes.fromhex("54686973206973206d7920417573747269616e20706572737065637469766521")
    ie = bytes.fromhex("893e28b9dc6ca8d611ab664754b8ceb7bac5117349a4439a6b0569da977c464a")
    re = bytes.fromhex("bbdb4cdbd309f1a1f2e1456967fe288cadd6f712d65dc7b7793d5e63da6b375b")
    msgs = [
        ("4c756477696720766f6e204d69736573",
         "ca35def5ae56cec33dc2036731ab14896bc4c75dbb07a61f879f8e3afa4c794479b962b8aff8485742ac32f905ba45369e2465fb59e138a93d67a0d1266b6a54"),
        ("4d757272617920526f746862617264",
         "95ebc60d2b1fa672c1f46a8aa265ef51bfe38e7ccb39ec5be34069f144808843d6062704d5a9c422a8e834423f8c1feada7e8d0d910a1a2cd030fb584221e3"),
        ("462e20412e20486179656b", "e632c3763d7669067383433197a3baddf146e9e70ad4b4e9e59e0f"),
        ("4361726c204d656e676572", "64c6bee32ea91c8474bb4c21d7a700109ad45af77b29764ba5eb1e"),
        ("4a65616e2d426170746973746520536179", "e2fa0bed0603b62d3ccac2ecabbf3fe33f3e86514909b323361626266cb2471cc8"),
        ("457567656e2042f6686d20766f6e2042617765726b",
         "0c01dc9cec1fe4ddd692e8dd32188aa351088dc91183639a53b57aa4692b5ebdef8b8ca111"),
    ]
    # (The vector's "handshake_hash" field is not checked: this copy's value does not match
    # the h that the messages and transport ciphertexts below imply.)

    ini = NNpsk0(prologue, psk)
    res = NNpsk0(prologue, psk)
    m1 = ini.write_message_1(ie, bytes.fromhex(msgs[0][0]))
    assert m1.hex() == msgs[0][1], "cacophony message 1"
    assert res.read_message_1(m1) == bytes.fromhex(msgs[0][0])
    m2 = res.write_message_2(re, bytes.fromhex(msgs[1][0]))
    assert m2.hex() == msgs[1][1], "cacophony message 2"
    assert ini.read_message_2(m2) == bytes.fromhex(msgs[1][0])
    assert ini.h == res.h
    k1, k2 = ini.split()
    assert (k1, k2) == res.split()
    # transport: after NN the initiator sends first (messages 3, 5 under k1; 4, 6 under k2)
    send = {True: CipherState(k1), False: CipherState(k2)}
    for i, (pt, ct) in enumerate(msgs[2:]):
        cs = send[i % 2 == 0]
        assert cs.encrypt_with_ad(b"", bytes.fromhex(pt)).hex() == ct, "cacophony transport %d" % (i + 3)


# ---------------------------------------------------------------------------------------
# §3.3: exchange payload

def addr16(a):
    """IPv6 address, or IPv4 in IPv4-mapped form (::ffff:a.b.c.d); None -> all zero."""
    if a is None:
        return b"\x00" * 16
    ip = ipaddress.ip_address(a)
    if ip.version == 4:
        return b"\x00" * 10 + b"\xff\xff" + ip.packed
    return ip.packed


def build_payload(ciphers, mtu, ipaddr, ptpaddr):
    p = struct.pack(">BBH", ciphers, 0, mtu) + addr16(ipaddr) + addr16(ptpaddr)
    assert len(p) == PAYLOAD_SIZE
    return p


def parse_payload(p):
    assert len(p) == PAYLOAD_SIZE
    ciphers, _reserved, mtu = struct.unpack(">BBH", p[:4])
    return {"ciphers": ciphers, "mtu": mtu, "addr": p[4:20], "expects": p[20:36]}


def payload_acceptable(pl, own_ip, own_ptp):
    zero = b"\x00" * 16
    me, peer = addr16(own_ip), addr16(own_ptp)
    if pl["addr"] == me:
        raise ProtocolError("sender's tunnel address equals our own (reflected?)")
    if peer != zero and pl["addr"] != peer:
        raise ProtocolError("sender's tunnel address differs from our ptpaddr")
    if pl["expects"] != zero and pl["expects"] != me:
        raise ProtocolError("sender expects an address that is not our ipaddr")


def choose_cipher(offered, accepted):
    common = offered & accepted
    if common & CIPHER_AESGCM:
        return CIPHER_AESGCM
    if common & CIPHER_CHACHA:
        return CIPHER_CHACHA
    raise ProtocolError("no common cipher")


# ---------------------------------------------------------------------------------------
# §3.1 / §3.2: initiation and response

def mac16(mac_key, data):
    return hmac256(mac_key, data)[:MAC_SIZE]


class Initiator:
    def __init__(self, psk, mac_key, index, timestamp, e_priv, ciphers, mtu, ipaddr, ptpaddr):
        self.psk, self.mac_key = psk, mac_key
        self.index, self.timestamp, self.e_priv = index, timestamp, e_priv
        self.ciphers, self.mtu, self.ipaddr, self.ptpaddr = ciphers, mtu, ipaddr, ptpaddr

    def initiation(self):
        header = struct.pack(">BBHIQ", VERSION, TYPE_INITIATION, 0, self.index, self.timestamp)
        assert len(header) == 16
        self.hs = NNpsk0(PROLOGUE_PREFIX + header, self.psk)
        noise_msg = self.hs.write_message_1(self.e_priv, build_payload(self.ciphers, self.mtu, self.ipaddr, self.ptpaddr))
        assert len(noise_msg) == 32 + PAYLOAD_SIZE + TAG_SIZE
        body = header + noise_msg
        msg = body + mac16(self.mac_key, body)
        assert len(msg) == INITIATION_SIZE
        return msg

    def receive_response(self, msg):
        # §3.4 "Receiving a response"
        if len(msg) != RESPONSE_SIZE or msg[0] != VERSION or msg[1] != TYPE_RESPONSE:
            raise ProtocolError("bad size/version/type")
        _v, _t, _r, sender, receiver = struct.unpack(">BBHII", msg[:12])
        if receiver != self.index:
            raise ProtocolError("receiver index is not our pending initiation")
        if not hmac.compare_digest(msg[96:112], mac16(self.mac_key, msg[:96])):
            raise ProtocolError("bad mac")
        try:
            pl = parse_payload(self.hs.read_message_2(msg[12:96]))
        except InvalidTag:
            raise ProtocolError("noise decryption failed")
        payload_acceptable(pl, self.ipaddr, self.ptpaddr)
        c = pl["ciphers"]
        if c not in (CIPHER_CHACHA, CIPHER_AESGCM) or not (c & self.ciphers):
            raise ProtocolError("chosen cipher not exactly one offered bit")
        self.peer_index, self.cipher, self.peer_payload = sender, c, pl
        self.k1, self.k2 = self.hs.split()
        return pl


class Responder:
    def __init__(self, psk, mac_key, index, e_priv, ciphers, mtu, ipaddr, ptpaddr):
        self.psk, self.mac_key = psk, mac_key
        self.index, self.e_priv = index, e_priv
        self.ciphers, self.mtu, self.ipaddr, self.ptpaddr = ciphers, mtu, ipaddr, ptpaddr
        self.last_ts = 0  # greatest accepted initiation timestamp since start

    def receive_initiation(self, msg):
        # §3.4 "Receiving an initiation", steps 1-4
        if len(msg) != INITIATION_SIZE or msg[0] != VERSION or msg[1] != TYPE_INITIATION:
            raise ProtocolError("bad size/version/type")
        if not hmac.compare_digest(msg[100:116], mac16(self.mac_key, msg[:100])):
            raise ProtocolError("bad mac")
        _v, _t, _r, sender, ts = struct.unpack(">BBHIQ", msg[:16])
        if ts <= self.last_ts:
            raise ProtocolError("stale timestamp")
        hs = NNpsk0(PROLOGUE_PREFIX + msg[:16], self.psk)
        try:
            pl = parse_payload(hs.read_message_1(msg[16:100]))
        except InvalidTag:
            raise ProtocolError("noise decryption failed")
        payload_acceptable(pl, self.ipaddr, self.ptpaddr)
        cipher = choose_cipher(pl["ciphers"], self.ciphers)
        self.hs, self.peer_index, self.peer_ts, self.cipher, self.peer_payload = hs, sender, ts, cipher, pl
        return pl

    def response(self):
        # §3.4 step 5
        header = struct.pack(">BBHII", VERSION, TYPE_RESPONSE, 0, self.index, self.peer_index)
        noise_msg = self.hs.write_message_2(self.e_priv, build_payload(self.cipher, self.mtu, self.ipaddr, self.ptpaddr))
        body = header + noise_msg
        msg = body + mac16(self.mac_key, body)
        assert len(msg) == RESPONSE_SIZE
        self.last_ts = self.peer_ts
        self.k1, self.k2 = self.hs.split()
        return msg


# ---------------------------------------------------------------------------------------
# §4: data

def aead(cipher, key):
    if cipher == CIPHER_CHACHA:
        return ChaCha20Poly1305(key)
    if cipher == CIPHER_AESGCM:
        return AESGCM(key)
    raise ValueError(cipher)


def data_nonce(counter):
    return b"\x00" * 4 + struct.pack(">Q", counter)


def seal_data(cipher, key, receiver_index, counter, flags, inner):
    header = struct.pack(">BBBBIQ", VERSION, TYPE_DATA, flags, 0, receiver_index, counter)
    assert len(header) == DATA_HEADER_SIZE
    msg = header + aead(cipher, key).encrypt(data_nonce(counter), inner, header)
    assert len(msg) == 32 + len(inner)
    return msg


def open_data(sessions, msg):
    """sessions: {our index: (cipher, receive key)}. Returns (flags, counter, inner)."""
    if len(msg) < 32 or msg[0] != VERSION or msg[1] != TYPE_DATA or msg[2] & ~KNOWN_FLAGS:
        raise ProtocolError("bad size/version/type/flags")
    _v, _t, flags, _r, receiver, counter = struct.unpack(">BBBBIQ", msg[:16])
    if receiver not in sessions:
        raise ProtocolError("unknown receiver index")
    if counter >= 1 << 33:
        raise ProtocolError("counter beyond reject limit")
    cipher, key = sessions[receiver]
    try:
        inner = aead(cipher, key).decrypt(data_nonce(counter), msg[16:], msg[:16])
    except InvalidTag:
        raise ProtocolError("aead open failed")
    return flags, counter, inner


def must_fail(fn, *args):
    try:
        fn(*args)
    except ProtocolError:
        return
    raise AssertionError("tampered message was accepted")


def flip(msg, i):
    b = bytearray(msg)
    b[i] ^= 0x01
    return bytes(b)


# ---------------------------------------------------------------------------------------
# Vectors

LINK_KEY = bytes(range(16))
INIT_E = bytes.fromhex("893e28b9dc6ca8d611ab664754b8ceb7bac5117349a4439a6b0569da977c464a")
RESP_E = bytes.fromhex("bbdb4cdbd309f1a1f2e1456967fe288cadd6f712d65dc7b7793d5e63da6b375b")
INNER = bytes.fromhex("45000021000040004001f56e0a0000010a00000208004d5168656c6c6f")  # used as given (29 bytes)

EXCHANGES = [
    # name, init index, timestamp, resp index, responder's accepted ciphers, expected choice
    ("A", 0x11223344, 1795000000123456789, 0x55667788, CIPHER_CHACHA, CIPHER_CHACHA),
    ("B", 0x11223345, 1795000000123456790, 0x55667789, CIPHER_CHACHA | CIPHER_AESGCM, CIPHER_AESGCM),
]


def out(name, value):
    print("%s = %s" % (name, value.hex()))


def run_exchange(psk, mac_key, name, i_index, ts, r_index, r_ciphers, expect_cipher):
    ini = Initiator(psk, mac_key, i_index, ts, INIT_E, 0x03, 1440, "10.0.0.1", "10.0.0.2")
    res = Responder(psk, mac_key, r_index, RESP_E, r_ciphers, 1420, "10.0.0.2", None)

    init_msg = ini.initiation()
    for i in (1, 5, 10, 20, 60, 105):          # header, index, timestamp, e, payload, mac
        must_fail(Responder(psk, mac_key, r_index, RESP_E, r_ciphers, 1420, "10.0.0.2", None).receive_initiation,
                  flip(init_msg, i))
    pl = res.receive_initiation(init_msg)
    assert pl["ciphers"] == 0x03 and pl["mtu"] == 1440
    assert pl["addr"] == addr16("10.0.0.1") and pl["expects"] == addr16("10.0.0.2")
    assert res.peer_index == i_index and res.peer_ts == ts
    assert res.cipher == expect_cipher

    resp_msg = res.response()
    must_fail(res.receive_initiation, init_msg)  # replay: timestamp no longer fresh
    for i in (1, 5, 9, 20, 60, 100):           # header, sender idx, receiver idx, e, payload, mac
        probe = Initiator(psk, mac_key, i_index, ts, INIT_E, 0x03, 1440, "10.0.0.1", "10.0.0.2")
        assert probe.initiation() == init_msg
        must_fail(probe.receive_response, flip(resp_msg, i))
    pl = ini.receive_response(resp_msg)
    assert pl["ciphers"] == expect_cipher and pl["mtu"] == 1420
    assert pl["addr"] == addr16("10.0.0.2") and pl["expects"] == b"\x00" * 16
    assert ini.peer_index == r_index and ini.cipher == expect_cipher
    assert (ini.k1, ini.k2) == (res.k1, res.k2) and ini.k1 != ini.k2

    c = expect_cipher
    d1 = seal_data(c, ini.k1, r_index, 0, 0, INNER)
    d2 = seal_data(c, ini.k1, r_index, 1, FLAG_PING, b"")
    d3 = seal_data(c, res.k2, i_index, 0, 0, INNER)

    at_responder = {r_index: (c, res.k1)}
    at_initiator = {i_index: (ini.cipher, ini.k2)}
    assert open_data(at_responder, d1) == (0, 0, INNER)
    assert open_data(at_responder, d2) == (FLAG_PING, 1, b"")
    assert open_data(at_initiator, d3) == (0, 0, INNER)
    for i in (2, 3, 7, 15, 16, len(d1) - 1):   # flags, reserved, index, counter, ct, tag
        must_fail(open_data, at_responder, flip(d1, i))
    must_fail(open_data, at_initiator, d1)      # wrong direction
    assert len(d1) == 32 + len(INNER) and len(d2) == 32

    out(name + ".initiation", init_msg)
    out(name + ".response", resp_msg)
    out(name + ".k1", ini.k1)
    out(name + ".k2", ini.k2)
    out(name + ".data1", d1)
    out(name + ".data2", d2)
    out(name + ".data3", d3)


def main():
    noise_selftest()
    psk, mac_key = derive_keys(LINK_KEY)
    out("psk", psk)
    out("mackey", mac_key)
    for ex in EXCHANGES:
        run_exchange(psk, mac_key, *ex)
    return 0


if __name__ == "__main__":
    sys.exit(main())
