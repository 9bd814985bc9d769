#!/usr/bin/env python3
"""Independent implementation of the ciped wire protocol, version 2, written from
PROTOCOL.md alone (no look at the Go code), printing known-answer vectors.

Needs Python 3 and the `cryptography` package (X25519, ChaCha20-Poly1305, AES-256-GCM).
ML-KEM-768 is written out below from FIPS 203 in pure Python (hashlib's SHA3 / SHAKE).
Prints `name = hex` lines on stdout, notes on stderr, and exits non-zero if any
self-check fails. The stdout is the same under every interpreter it runs with.

What is implemented (section numbers refer to PROTOCOL.md, version 2):
  §2    psk / macKey derivation with the v2 labels ("ciped v2 psk", "ciped v2 mac")
  §3    Noise_NNhfs+psk0_25519+MLKEM768_ChaChaPoly_SHA256:  -> psk, e, e1   <- e, ee, ekem1
        (prologue "ciped v2" || initiation header with part = 0; split into k1, k2)
  §3.1  initiation: Noise message 1 (1284 bytes) in two parts of 674 bytes, each with a mac
  §3.2  response: Noise message 2 (1188 bytes) in two parts of 622 bytes, each with a mac
  §3.3  exchange payload (36 bytes), the payload rules and the cipher choice
  §3.4  the receive-side checks that can be made on a single exchange: size, version, type,
        part, receiver index, mac, timestamp freshness, keeping and joining the two parts
        (either order, copies dropped, greater timestamp / other sender index replaces),
        decryption, the FIPS 203 encapsulation-key check, payload rules, cipher choice
  §4    data messages (version 2) under ChaCha20-Poly1305 or AES-256-GCM
  §10   one version-1 initiation (Noise_NNpsk0_25519_ChaChaPoly_SHA256, 116 bytes, v1 labels)
        and the check a version-2 peer makes on it
  FIPS 203 ML-KEM-768: KeyGen_internal(d, z), Encaps_internal(ek, m), Decaps (with its
        input checks) and the encapsulation-key input check of FIPS 203 §7.2

Self-checks:
  * the Noise token functions (psk, e, ee) against the published cacophony vector for
    Noise_NNpsk0_25519_ChaChaPoly_SHA256 (handshake and transport messages);
  * ML-KEM-768: Decaps(Encaps) round trip, implicit rejection, the §7.2 input check (a
    coefficient 3329 or 4095, a wrong length refused); and, when the `cryptography` package
    has ML-KEM (version 47 or later), a cross-check against it: the encapsulation key from
    the seed d || z, its decapsulation of our ciphertext (good and altered), our Decaps of
    its (random) encapsulation. Without it the cross-check is skipped with a note on
    stderr, and the key / ciphertext / secret are compared with digests of values that
    were cross-checked that way;
  * each part of each initiation is processed responder-side and each part of each response
    initiator-side; every part with a flipped bit (header, indices, timestamp, body, mac) is
    refused and changes nothing; a part with a bad version, type or part number (re-mac'd)
    is refused at step 1; a wrong-key mac is refused; parts are accepted in reverse
    order; a copy of a part is dropped; parts of an initiation with a greater timestamp
    replace those kept, and parts of one with a smaller timestamp are dropped; parts
    altered and re-mac'd by a holder of the link key fail decryption (the prologue binds the
    index and timestamp); a response part of another sender index replaces those kept; an
    initiation carrying an encapsulation key with a coefficient >= 3329 is refused; a
    low-order X25519 key ends the exchange; payload rules and cipher choice are enforced;
    after a failed response the initiation is still waited on; parts replayed after the
    exchange are refused; both sides' split keys agree;
  * each data message is opened again by the receiving side, and tampering is detected
    (also well-sealed messages with version 1, type 4 or an unknown flag are refused);
  * the version-1 initiation has the size, version, type and mac §10 describes, decrypts
    as Noise NNpsk0 under the v1 psk, and is dropped by the version-2 receive path.
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


class ProtocolError(Exception):
    """A receiver drops (refuses) a datagram or an exchange."""


class SelfCheckFailed(Exception):
    pass


def check(cond, what):
    if not cond:
        raise SelfCheckFailed(what)


def note(msg):
    sys.stderr.write("protocol-vectors: %s\n" % msg)


# =======================================================================================
# FIPS 203: ML-KEM-768, written from the standard (Algorithms 3-18 and §7)

Q = 3329
N = 256
K = 3            # ML-KEM-768
ETA1 = 2
ETA2 = 2
DU = 10
DV = 4

KEM_EK_SIZE = 384 * K + 32            # 1184
KEM_DK_SIZE = 768 * K + 96            # 2400
KEM_CT_SIZE = 32 * (DU * K + DV)      # 1088
KEM_SS_SIZE = 32


def _bitrev7(i):
    r = 0
    for _ in range(7):
        r = (r << 1) | (i & 1)
        i >>= 1
    return r


ZETAS = [pow(17, _bitrev7(i), Q) for i in range(128)]              # zeta^BitRev7(i)
GAMMAS = [pow(17, 2 * _bitrev7(i) + 1, Q) for i in range(128)]     # zeta^(2 BitRev7(i) + 1)
N_INV = pow(128, Q - 2, Q)                                          # 3303


def kem_H(s):
    return hashlib.sha3_256(s).digest()


def kem_J(s):
    return hashlib.shake_256(s).digest(32)


def kem_G(c):
    g = hashlib.sha3_512(c).digest()
    return g[:32], g[32:]


def kem_PRF(eta, s, b):
    return hashlib.shake_256(s + bytes([b])).digest(64 * eta)


def byte_encode(F, d):
    """Algorithm 5: d bits per coefficient, least significant bit first."""
    x = 0
    for i in reversed(range(N)):
        x = (x << d) | F[i]
    return x.to_bytes(32 * d, "little")


def byte_decode(B, d):
    """Algorithm 6 (for d = 12 the values are reduced modulo q)."""
    x = int.from_bytes(B, "little")
    mask = (1 << d) - 1
    F = [(x >> (d * i)) & mask for i in range(N)]
    if d == 12:
        F = [a % Q for a in F]
    return F


def compress(x, d):
    # round(2^d / q * x) mod 2^d, with round(y) = floor(y + 1/2)
    return (((x << (d + 1)) + Q) // (2 * Q)) & ((1 << d) - 1)


def decompress(y, d):
    # round(q / 2^d * y)
    return (Q * y + (1 << (d - 1))) >> d


def sample_ntt(B):
    """Algorithm 7: rejection sampling from SHAKE128(B), B = rho || j || i."""
    n = 840
    while True:
        stream = hashlib.shake_128(B).digest(n)
        a = []
        pos = 0
        while len(a) < N and pos + 3 <= n:
            c0, c1, c2 = stream[pos], stream[pos + 1], stream[pos + 2]
            pos += 3
            d1 = c0 + 256 * (c1 % 16)
            d2 = (c1 // 16) + 16 * c2
            if d1 < Q:
                a.append(d1)
            if d2 < Q and len(a) < N:
                a.append(d2)
        if len(a) == N:
            return a
        n *= 2      # the XOF output is a prefix-stable stream: squeeze more and redo


def sample_poly_cbd(B, eta):
    """Algorithm 8."""
    x = int.from_bytes(B, "little")
    f = []
    for i in range(N):
        a = 0
        b = 0
        for j in range(eta):
            a += (x >> (2 * i * eta + j)) & 1
            b += (x >> (2 * i * eta + eta + j)) & 1
        f.append((a - b) % Q)
    return f


def ntt(f):
    """Algorithm 9."""
    f = list(f)
    i = 1
    length = 128
    while length >= 2:
        for start in range(0, N, 2 * length):
            zeta = ZETAS[i]
            i += 1
            for j in range(start, start + length):
                t = zeta * f[j + length] % Q
                f[j + length] = (f[j] - t) % Q
                f[j] = (f[j] + t) % Q
        length //= 2
    return f


def ntt_inv(f):
    """Algorithm 10."""
    f = list(f)
    i = 127
    length = 2
    while length <= 128:
        for start in range(0, N, 2 * length):
            zeta = ZETAS[i]
            i -= 1
            for j in range(start, start + length):
                t = f[j]
                f[j] = (t + f[j + length]) % Q
                f[j + length] = zeta * (f[j + length] - t) % Q
        length *= 2
    return [a * N_INV % Q for a in f]


def multiply_ntts(f, g):
    """Algorithms 11 and 12."""
    h = [0] * N
    for i in range(128):
        a0, a1 = f[2 * i], f[2 * i + 1]
        b0, b1 = g[2 * i], g[2 * i + 1]
        h[2 * i] = (a0 * b0 + a1 * b1 * GAMMAS[i]) % Q
        h[2 * i + 1] = (a0 * b1 + a1 * b0) % Q
    return h


def poly_add(f, g):
    return [(a + b) % Q for a, b in zip(f, g)]


def poly_sub(f, g):
    return [(a - b) % Q for a, b in zip(f, g)]


def _matrix_a(rho):
    # A_hat[i][j] = SampleNTT(rho || j || i)
    return [[sample_ntt(rho + bytes([j, i])) for j in range(K)] for i in range(K)]


def kpke_keygen(d):
    """Algorithm 13."""
    rho, sigma = kem_G(d + bytes([K]))
    nonce = 0
    A = _matrix_a(rho)
    s = []
    for _ in range(K):
        s.append(sample_poly_cbd(kem_PRF(ETA1, sigma, nonce), ETA1))
        nonce += 1
    e = []
    for _ in range(K):
        e.append(sample_poly_cbd(kem_PRF(ETA1, sigma, nonce), ETA1))
        nonce += 1
    s_hat = [ntt(p) for p in s]
    e_hat = [ntt(p) for p in e]
    t_hat = []
    for i in range(K):
        acc = e_hat[i]
        for j in range(K):
            acc = poly_add(acc, multiply_ntts(A[i][j], s_hat[j]))
        t_hat.append(acc)
    ek = b"".join(byte_encode(p, 12) for p in t_hat) + rho
    dk = b"".join(byte_encode(p, 12) for p in s_hat)
    return ek, dk


def kpke_encrypt(ek, m, r):
    """Algorithm 14."""
    nonce = 0
    t_hat = [byte_decode(ek[384 * i:384 * (i + 1)], 12) for i in range(K)]
    rho = ek[384 * K:384 * K + 32]
    A = _matrix_a(rho)
    y = []
    for _ in range(K):
        y.append(sample_poly_cbd(kem_PRF(ETA1, r, nonce), ETA1))
        nonce += 1
    e1 = []
    for _ in range(K):
        e1.append(sample_poly_cbd(kem_PRF(ETA2, r, nonce), ETA2))
        nonce += 1
    e2 = sample_poly_cbd(kem_PRF(ETA2, r, nonce), ETA2)
    y_hat = [ntt(p) for p in y]
    u = []
    for i in range(K):
        acc = [0] * N
        for j in range(K):
            acc = poly_add(acc, multiply_ntts(A[j][i], y_hat[j]))   # A_hat transposed
        u.append(poly_add(ntt_inv(acc), e1[i]))
    mu = [decompress(b, 1) for b in byte_decode(m, 1)]
    acc = [0] * N
    for j in range(K):
        acc = poly_add(acc, multiply_ntts(t_hat[j], y_hat[j]))
    v = poly_add(poly_add(ntt_inv(acc), e2), mu)
    c1 = b"".join(byte_encode([compress(a, DU) for a in p], DU) for p in u)
    c2 = byte_encode([compress(a, DV) for a in v], DV)
    return c1 + c2


def kpke_decrypt(dk, c):
    """Algorithm 15."""
    c1, c2 = c[:32 * DU * K], c[32 * DU * K:32 * (DU * K + DV)]
    u = [[decompress(a, DU) for a in byte_decode(c1[32 * DU * i:32 * DU * (i + 1)], DU)] for i in range(K)]
    v = [decompress(a, DV) for a in byte_decode(c2, DV)]
    s_hat = [byte_decode(dk[384 * i:384 * (i + 1)], 12) for i in range(K)]
    acc = [0] * N
    for i in range(K):
        acc = poly_add(acc, multiply_ntts(s_hat[i], ntt(u[i])))
    w = poly_sub(v, ntt_inv(acc))
    return byte_encode([compress(a, 1) for a in w], 1)


def mlkem_keygen_internal(d, z):
    """Algorithm 16: returns (ek, dk)."""
    assert len(d) == 32 and len(z) == 32
    ek, dk_pke = kpke_keygen(d)
    return ek, dk_pke + ek + kem_H(ek) + z


def mlkem_ek_check(ek):
    """FIPS 203 §7.2, input checking for ML-KEM.Encaps: type (length) check and modulus
    check (every 12-bit coefficient of the encoded vector below q)."""
    if len(ek) != KEM_EK_SIZE:
        return False
    for i in range(K):
        chunk = ek[384 * i:384 * (i + 1)]
        if byte_encode(byte_decode(chunk, 12), 12) != chunk:
            return False
    return True


def mlkem_encaps_internal(ek, m):
    """Algorithm 17: returns (K, c)."""
    assert len(m) == 32
    key, r = kem_G(m + kem_H(ek))
    return key, kpke_encrypt(ek, m, r)


def mlkem_decaps(dk, c):
    """ML-KEM.Decaps: the input checks of FIPS 203 §7.3, then Algorithm 18."""
    if len(c) != KEM_CT_SIZE or len(dk) != KEM_DK_SIZE:
        raise ValueError("ML-KEM.Decaps: wrong length")
    if kem_H(dk[384 * K:768 * K + 32]) != dk[768 * K + 32:768 * K + 64]:
        raise ValueError("ML-KEM.Decaps: hash check failed")
    dk_pke = dk[:384 * K]
    ek_pke = dk[384 * K:768 * K + 32]
    h = dk[768 * K + 32:768 * K + 64]
    z = dk[768 * K + 64:768 * K + 96]
    m2 = kpke_decrypt(dk_pke, c)
    key2, r2 = kem_G(m2 + h)
    key_bar = kem_J(z + c)
    c2 = kpke_encrypt(ek_pke, m2, r2)
    if not hmac.compare_digest(c, c2):
        key2 = key_bar
    return key2


def _set_coefficient(ek, index, value):
    """ek with 12-bit coefficient `index` of its encoded vector set to `value` (0..4095)."""
    b = bytearray(ek)
    pos = (index // 2) * 3
    if index % 2 == 0:
        b[pos] = value & 0xff
        b[pos + 1] = (b[pos + 1] & 0xf0) | (value >> 8)
    else:
        b[pos + 1] = (b[pos + 1] & 0x0f) | ((value & 0x0f) << 4)
        b[pos + 2] = value >> 4
    return bytes(b)


# Digests of values this implementation produced that were cross-checked against the
# `cryptography` package (48.0.0, OpenSSL's ML-KEM): the encapsulation key from the §9 seed,
# and the §9 ciphertext and shared secret (their decapsulation gave our secret). They let
# an interpreter without ML-KEM in `cryptography` still detect a wrong ML-KEM.
KAT_EK_SHA256 = "9af96e00098351ae9c790abe15d80d96e294dbca80f99039d9320f3152e5cdbf"
KAT_CT_SS_SHA256 = "b3683a4a26b4c777668d77cf27a485ade76124c7b9d80afa182ecd12dad41970"


def mlkem_selftest(d, z, m):
    """Round trip, implicit rejection, §7.2 check; cross-check against `cryptography`."""
    ek, dk = mlkem_keygen_internal(d, z)
    check(len(ek) == KEM_EK_SIZE and len(dk) == KEM_DK_SIZE, "ML-KEM key sizes")
    check(mlkem_ek_check(ek), "ML-KEM: own encapsulation key passes the §7.2 check")
    ss, ct = mlkem_encaps_internal(ek, m)
    check(len(ct) == KEM_CT_SIZE and len(ss) == KEM_SS_SIZE, "ML-KEM ciphertext / secret sizes")
    check(mlkem_decaps(dk, ct) == ss, "ML-KEM Decaps(Encaps) round trip")
    bad_ct = ct[:100] + bytes([ct[100] ^ 1]) + ct[101:]
    rejected = mlkem_decaps(dk, bad_ct)
    check(rejected != ss and rejected == kem_J(dk[768 * K + 64:] + bad_ct), "ML-KEM implicit rejection")
    # FIPS 203 §7.2 modulus check: a coefficient of q or more is refused, q - 1 is not
    for idx in (0, 1, 255, 256, 767):
        check(not mlkem_ek_check(_set_coefficient(ek, idx, Q)), "ek check: coefficient %d = 3329" % idx)
        check(not mlkem_ek_check(_set_coefficient(ek, idx, 4095)), "ek check: coefficient %d = 4095" % idx)
        check(mlkem_ek_check(_set_coefficient(ek, idx, Q - 1)), "ek check: coefficient %d = 3328" % idx)
    check(not mlkem_ek_check(ek[:-1]) and not mlkem_ek_check(ek + b"\x00"), "ek check: length")
    check(mlkem_ek_check(ek[:-32] + b"\xff" * 32), "ek check: rho is not checked")

    try:
        from cryptography.hazmat.primitives.asymmetric import mlkem as c_mlkem
        their_sk = c_mlkem.MLKEM768PrivateKey.from_seed_bytes(d + z)
    except Exception as exc:   # ImportError (cryptography < 47) or UnsupportedAlgorithm
        note("cryptography package lacks ML-KEM (%s: %s): cross-check skipped, "
             "comparing with recorded digests only" % (type(exc).__name__, exc))
    else:
        import cryptography
        their_ek = their_sk.public_key().public_bytes_raw()
        check(their_ek == ek, "cross-check: encapsulation key from seed d || z")
        check(their_sk.decapsulate(ct) == ss, "cross-check: their Decaps of our ciphertext")
        check(their_sk.decapsulate(bad_ct) == rejected, "cross-check: implicit rejection")
        for _ in range(3):
            their_ss, their_ct = their_sk.public_key().encapsulate()
            check(mlkem_decaps(dk, their_ct) == their_ss, "cross-check: our Decaps of their ciphertext")
        note("ML-KEM-768 cross-check against cryptography %s passed "
             "(ek from seed, their Decaps of our ciphertext and of an altered one, "
             "our Decaps of 3 of their encapsulations)" % cryptography.__version__)
    check(hashlib.sha256(ek).hexdigest() == KAT_EK_SHA256, "recorded digest of kem.ek")
    check(hashlib.sha256(ct + ss).hexdigest() == KAT_CT_SS_SHA256, "recorded digest of kem.ct || kem.ss")
    return ek


# =======================================================================================
# Constants (§1, §3, §4, §7)

VERSION = 2
TYPE_INITIATION = 1
TYPE_RESPONSE = 2
TYPE_DATA = 3

INIT_HEADER_SIZE = 16
RESP_HEADER_SIZE = 12
MAC_SIZE = 16
TAG_SIZE = 16
PAYLOAD_SIZE = 36
X25519_SIZE = 32

NOISE_MSG1_SIZE = X25519_SIZE + KEM_EK_SIZE + TAG_SIZE + PAYLOAD_SIZE + TAG_SIZE   # 1284
NOISE_MSG2_SIZE = X25519_SIZE + KEM_CT_SIZE + TAG_SIZE + PAYLOAD_SIZE + TAG_SIZE   # 1188
MSG1_HALF = NOISE_MSG1_SIZE // 2                                                  # 642
MSG2_HALF = NOISE_MSG2_SIZE // 2                                                  # 594
INIT_PART_SIZE = INIT_HEADER_SIZE + MSG1_HALF + MAC_SIZE                          # 674
RESP_PART_SIZE = RESP_HEADER_SIZE + MSG2_HALF + MAC_SIZE                          # 622

DATA_HEADER_SIZE = 16

CIPHER_CHACHA = 0x01
CIPHER_AESGCM = 0x02

FLAG_PING = 0x01
FLAG_GOODBYE = 0x02
FLAG_CSUM_PARTIAL = 0x04
FLAG_PROBE = 0x08
FLAG_PROBE_ACK = 0x10
KNOWN_FLAGS = FLAG_PING | FLAG_GOODBYE | FLAG_CSUM_PARTIAL | FLAG_PROBE | FLAG_PROBE_ACK

NOISE_NAME_V2 = b"Noise_NNhfs+psk0_25519+MLKEM768_ChaChaPoly_SHA256"
PATTERN_V2 = (("psk", "e", "e1"), ("e", "ee", "ekem1"))
PROLOGUE_V2 = b"ciped v2"

NOISE_NAME_NNPSK0 = b"Noise_NNpsk0_25519_ChaChaPoly_SHA256"
PATTERN_NNPSK0 = (("psk", "e"), ("e", "ee"))

assert len(NOISE_NAME_V2) == 49
assert (NOISE_MSG1_SIZE, NOISE_MSG2_SIZE, INIT_PART_SIZE, RESP_PART_SIZE) == (1284, 1188, 674, 622)


# =======================================================================================
# Primitives

def hmac256(key, msg):
    return hmac.new(key, msg, hashlib.sha256).digest()


def x25519_priv(raw):
    return X25519PrivateKey.from_private_bytes(raw)


def x25519_pub(priv):
    return priv.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def x25519_dh(priv, pub_raw):
    """X25519; a result of 32 zero bytes (low-order public key) ends the exchange (§3)."""
    try:
        out = priv.exchange(X25519PublicKey.from_public_bytes(pub_raw))
    except ValueError:          # OpenSSL refuses the all-zero result itself
        raise ProtocolError("X25519 result is all zero (low-order public key)")
    if out == b"\x00" * 32:
        raise ProtocolError("X25519 result is all zero (low-order public key)")
    return out


# =======================================================================================
# §2: keys derived from the link key

def derive_keys(link_key, version=2):
    assert len(link_key) == 16
    psk = hmac256(link_key, b"ciped v%d psk" % version)
    mac_key = hmac256(link_key, b"ciped v%d mac" % version)
    return psk, mac_key


# =======================================================================================
# §3: Noise. One HandshakeState with one function per token, used by both the v2 pattern
# (psk, e, e1 / e, ee, ekem1) and NNpsk0 (psk, e / e, ee: the published vector, and v1).

def noise_hkdf(ck, ikm, n):
    temp = hmac256(ck, ikm)
    out1 = hmac256(temp, b"\x01")
    out2 = hmac256(temp, out1 + b"\x02")
    if n == 2:
        return out1, out2
    return out1, out2, hmac256(temp, out2 + b"\x03")


class CipherState:
    """Noise CipherState with ChaChaPoly: nonce = 4 zero bytes || 64-bit little-endian n."""

    def __init__(self, k=None, n=0):
        self.k = k
        self.n = n

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
        try:
            pt = ChaCha20Poly1305(self.k).decrypt(self._nonce(), ct, ad)
        except InvalidTag:
            raise ProtocolError("Noise decryption failed")
        self.n += 1
        return pt


class HandshakeState:
    """One side of a Noise handshake made of the tokens psk, e, ee, e1, ekem1.

    The ephemeral inputs are given (as in test vectors): e_priv (X25519 private key),
    kem_seed (d, z) for e1, kem_m for ekem1."""

    def __init__(self, name, pattern, prologue, psk=None, e_priv=None, kem_seed=None, kem_m=None):
        self.h = hashlib.sha256(name).digest() if len(name) > 32 else name + b"\x00" * (32 - len(name))
        self.ck = self.h
        self.cs = CipherState()
        self.pattern = pattern
        self.psk_mode = b"psk" in name.split(b"_")[1]
        self.psk = psk
        self.e_priv, self.kem_seed, self.kem_m = e_priv, kem_seed, kem_m
        self.e = None      # own X25519 private key object
        self.re = None     # remote X25519 public key
        self.e1 = None     # own ML-KEM (ek, dk)
        self.re1 = None    # remote ML-KEM encapsulation key
        self.kem_ct = self.kem_ss = None
        self.e_pub_override = None       # test hook: send these 32 bytes as "e"
        self.ek_override = None          # test hook: send this as the encapsulation key
        self.mix_hash(prologue)

    # --- symmetric state
    def mix_hash(self, data):
        self.h = hashlib.sha256(self.h + data).digest()

    def mix_key(self, ikm):
        self.ck, k = noise_hkdf(self.ck, ikm, 2)
        self.cs = CipherState(k)

    def mix_key_and_hash(self, ikm):
        self.ck, t, k = noise_hkdf(self.ck, ikm, 3)
        self.mix_hash(t)
        self.cs = CipherState(k)

    def encrypt_and_hash(self, pt):
        ct = self.cs.encrypt_with_ad(self.h, pt)
        self.mix_hash(ct)
        return ct

    def decrypt_and_hash(self, ct):
        pt = self.cs.decrypt_with_ad(self.h, ct)
        self.mix_hash(ct)
        return pt

    def _enc_len(self, n):
        return n + (TAG_SIZE if self.cs.k is not None else 0)

    def snapshot(self):
        return (self.h, self.ck, self.cs.k, self.cs.n, self.re, self.re1)

    def restore(self, snap):
        self.h, self.ck, k, n, self.re, self.re1 = snap
        self.cs = CipherState(k, n)

    # --- tokens: write_X returns the bytes sent; read_X consumes from msg at off
    def write_psk(self):
        self.mix_key_and_hash(self.psk)
        return b""

    def read_psk(self, msg, off):
        self.mix_key_and_hash(self.psk)
        return off

    def write_e(self):
        self.e = x25519_priv(self.e_priv)
        pub = self.e_pub_override or x25519_pub(self.e)
        self.mix_hash(pub)
        if self.psk_mode:
            self.mix_key(pub)
        return pub

    def read_e(self, msg, off):
        self.re = msg[off:off + X25519_SIZE]
        self.mix_hash(self.re)
        if self.psk_mode:
            self.mix_key(self.re)
        return off + X25519_SIZE

    def write_ee(self):
        self.mix_key(x25519_dh(self.e, self.re))
        return b""

    def read_ee(self, msg, off):
        self.mix_key(x25519_dh(self.e, self.re))
        return off

    def write_e1(self):
        self.e1 = mlkem_keygen_internal(*self.kem_seed)
        return self.encrypt_and_hash(self.ek_override or self.e1[0])     # no MixKey

    def read_e1(self, msg, off):
        n = self._enc_len(KEM_EK_SIZE)
        ek = self.decrypt_and_hash(msg[off:off + n])
        if not mlkem_ek_check(ek):
            raise ProtocolError("encapsulation key fails the FIPS 203 §7.2 check")
        self.re1 = ek
        return off + n

    def write_ekem1(self):
        self.kem_ss, self.kem_ct = mlkem_encaps_internal(self.re1, self.kem_m)
        out = self.encrypt_and_hash(self.kem_ct)     # first the ciphertext under the old key,
        self.mix_key(self.kem_ss)                    # then the KEM secret
        return out

    def read_ekem1(self, msg, off):
        n = self._enc_len(KEM_CT_SIZE)
        self.kem_ct = self.decrypt_and_hash(msg[off:off + n])
        self.kem_ss = mlkem_decaps(self.e1[1], self.kem_ct)
        self.mix_key(self.kem_ss)
        return off + n

    # --- messages
    def write_message(self, index, payload):
        out = b"".join(getattr(self, "write_" + t)() for t in self.pattern[index])
        return out + self.encrypt_and_hash(payload)

    def read_message(self, index, msg):
        off = 0
        for t in self.pattern[index]:
            off = getattr(self, "read_" + t)(msg, off)
        return self.decrypt_and_hash(msg[off:])

    def split(self):
        return noise_hkdf(self.ck, b"", 2)


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

    ini = HandshakeState(NOISE_NAME_NNPSK0, PATTERN_NNPSK0, prologue, psk, e_priv=ie)
    res = HandshakeState(NOISE_NAME_NNPSK0, PATTERN_NNPSK0, prologue, psk, e_priv=re)
    m1 = ini.write_message(0, bytes.fromhex(msgs[0][0]))
    check(m1.hex() == msgs[0][1], "cacophony message 1")
    check(res.read_message(0, m1) == bytes.fromhex(msgs[0][0]), "cacophony message 1 read")
    m2 = res.write_message(1, bytes.fromhex(msgs[1][0]))
    check(m2.hex() == msgs[1][1], "cacophony message 2")
    check(ini.read_message(1, m2) == bytes.fromhex(msgs[1][0]), "cacophony message 2 read")
    check(ini.h == res.h, "cacophony handshake hash agrees")
    k1, k2 = ini.split()
    check((k1, k2) == res.split(), "cacophony split")
    # transport: after NN the initiator sends first (messages 3, 5 under k1; 4, 6 under k2)
    send = {True: CipherState(k1), False: CipherState(k2)}
    for i, (pt, ct) in enumerate(msgs[2:]):
        cs = send[i % 2 == 0]
        check(cs.encrypt_with_ad(b"", bytes.fromhex(pt)).hex() == ct, "cacophony transport %d" % (i + 3))


# =======================================================================================
# §3.3: exchange payload

ZERO16 = b"\x00" * 16


def addr16(a):
    """IPv6 address, or IPv4 in IPv4-mapped form (::ffff:a.b.c.d); None -> all zero."""
    if a is None:
        return ZERO16
    ip = ipaddress.ip_address(a)
    if ip.version == 4:
        return b"\x00" * 10 + b"\xff\xff" + ip.packed
    return ip.packed


def addr_from16(b):
    if b[:12] == b"\x00" * 10 + b"\xff\xff":
        return ipaddress.IPv4Address(b[12:])
    return ipaddress.IPv6Address(b)


def build_payload(ciphers, mtu, ipaddr, ptpaddr):
    p = struct.pack(">BBH", ciphers, 0, mtu) + addr16(ipaddr) + addr16(ptpaddr)
    assert len(p) == PAYLOAD_SIZE
    return p


def parse_payload(p):
    if len(p) != PAYLOAD_SIZE:
        raise ProtocolError("payload size")
    ciphers, _reserved, mtu = struct.unpack(">BBH", p[:4])
    return {"ciphers": ciphers, "mtu": mtu, "addr": p[4:20], "expects": p[20:36]}


def payload_acceptable(pl, own_ip, own_ptp, learned=None):
    """§3.3 rules. own_ptp is a single address or None (ptpaddr ranges, the receiver's other
    host addresses and the sender's carrier address are not modelled here)."""
    me = addr16(own_ip)
    sender = addr_from16(pl["addr"])
    if pl["addr"] == me:
        raise ProtocolError("sender's tunnel address equals our own ipaddr (reflected?)")
    if own_ptp is not None and pl["addr"] != addr16(own_ptp):
        raise ProtocolError("sender's tunnel address is not our ptpaddr")
    if pl["expects"] != ZERO16 and pl["expects"] != me:
        raise ProtocolError("sender expects an address that is not our ipaddr")
    if sender.version != ipaddress.ip_address(own_ip).version:
        raise ProtocolError("sender's tunnel address is of another IP version")
    if own_ptp is None:     # to learn it: refuse addresses no peer can own
        if (sender.is_unspecified or sender.is_loopback or sender.is_multicast or sender.is_link_local
                or sender == ipaddress.IPv4Address("255.255.255.255")):
            raise ProtocolError("sender's tunnel address is one no peer can own")
    if learned is not None and pl["addr"] != learned:
        raise ProtocolError("sender's tunnel address differs from the one learned before")


def choose_cipher(offered, accepted):
    common = offered & accepted
    if common & CIPHER_AESGCM:
        return CIPHER_AESGCM
    if common & CIPHER_CHACHA:
        return CIPHER_CHACHA
    raise ProtocolError("no common cipher")


# =======================================================================================
# §3.1 / §3.2 / §3.4: initiation and response, in parts

def mac16(mac_key, data):
    return hmac256(mac_key, data)[:MAC_SIZE]


def init_header(part, index, timestamp):
    return struct.pack(">BBBBIQ", VERSION, TYPE_INITIATION, part, 0, index, timestamp)


def resp_header(part, sender, receiver):
    return struct.pack(">BBBBII", VERSION, TYPE_RESPONSE, part, 0, sender, receiver)


def make_part(mac_key, header, body):
    return header + body + mac16(mac_key, header + body)


class Initiator:
    def __init__(self, keys, index, timestamp, e_priv, kem_seed, ciphers, mtu, ipaddr, ptpaddr):
        self.psk, self.mac_key = keys
        self.index, self.timestamp, self.e_priv, self.kem_seed = index, timestamp, e_priv, kem_seed
        self.ciphers, self.mtu, self.ipaddr, self.ptpaddr = ciphers, mtu, ipaddr, ptpaddr
        self.waiting = False
        self.e_pub_override = self.ek_override = None     # test hooks

    def initiation(self):
        h0 = init_header(0, self.index, self.timestamp)
        self.hs = HandshakeState(NOISE_NAME_V2, PATTERN_V2, PROLOGUE_V2 + h0, self.psk,
                                 e_priv=self.e_priv, kem_seed=self.kem_seed)
        self.hs.e_pub_override, self.hs.ek_override = self.e_pub_override, self.ek_override
        msg1 = self.hs.write_message(0, build_payload(self.ciphers, self.mtu, self.ipaddr, self.ptpaddr))
        check(len(msg1) == NOISE_MSG1_SIZE, "Noise message 1 size")
        parts = tuple(make_part(self.mac_key, init_header(p, self.index, self.timestamp),
                                msg1[p * MSG1_HALF:(p + 1) * MSG1_HALF]) for p in (0, 1))
        check(all(len(p) == INIT_PART_SIZE for p in parts), "initiation part size")
        self.after_msg1 = self.hs.snapshot()
        self.waiting = True
        self.kept = None            # (sender index, {part: datagram})
        return parts

    def state(self):
        return (self.waiting, self.kept and (self.kept[0], dict(self.kept[1])))

    def receive_response_part(self, d):
        """§3.4 "Receiving a response part". Returns None while a part is missing, the
        responder's payload when the exchange completes; raises ProtocolError on a drop."""
        # 1. size, version, type, part
        if len(d) != RESP_PART_SIZE or d[0] != VERSION or d[1] != TYPE_RESPONSE or d[2] not in (0, 1):
            raise ProtocolError("bad size/version/type/part")
        _v, _t, part, _r, sender, receiver = struct.unpack(">BBBBII", d[:RESP_HEADER_SIZE])
        # 2. receiver index is that of the initiation waited on
        if not self.waiting or receiver != self.index:
            raise ProtocolError("receiver index is not our pending initiation")
        # 3. mac
        if not hmac.compare_digest(d[RESP_PART_SIZE - MAC_SIZE:], mac16(self.mac_key, d[:RESP_PART_SIZE - MAC_SIZE])):
            raise ProtocolError("bad mac")
        # 4. keep: the parts of one sender index at a time
        if self.kept is None or self.kept[0] != sender:
            self.kept = (sender, {})
        elif part in self.kept[1]:
            raise ProtocolError("copy of a kept part")
        self.kept[1][part] = d
        if len(self.kept[1]) < 2:
            return None
        # 5. join, decrypt (decapsulation in the middle), payload, cipher
        parts, self.kept = self.kept[1], None
        msg2 = b"".join(parts[p][RESP_HEADER_SIZE:RESP_PART_SIZE - MAC_SIZE] for p in (0, 1))
        self.hs.restore(self.after_msg1)       # a failure leaves the initiation waited on
        pl = parse_payload(self.hs.read_message(1, msg2))
        payload_acceptable(pl, self.ipaddr, self.ptpaddr)
        c = pl["ciphers"]
        if c not in (CIPHER_CHACHA, CIPHER_AESGCM) or not (c & self.ciphers):
            raise ProtocolError("chosen cipher is not exactly one offered bit")
        self.waiting = False                   # the initiation is forgotten
        self.peer_index, self.cipher, self.peer_payload = sender, c, pl
        self.k1, self.k2 = self.hs.split()
        self.kem_ct, self.kem_ss = self.hs.kem_ct, self.hs.kem_ss
        return pl


class Responder:
    def __init__(self, keys, index, e_priv, kem_m, ciphers, mtu, ipaddr, ptpaddr, old_keys=None):
        self.keys = [keys] + ([old_keys] if old_keys else [])   # current first, then old (§2)
        self.index, self.e_priv, self.kem_m = index, e_priv, kem_m
        self.ciphers, self.mtu, self.ipaddr, self.ptpaddr = ciphers, mtu, ipaddr, ptpaddr
        self.last_ts = 0    # greatest accepted initiation timestamp since start
        self.kept = None    # (timestamp, sender index, key slot, {part: datagram})
        self.hs = None
        self.force_cipher = None   # test hooks: choose this value whatever was offered,
        self.claim = None          # send these (ipaddr, ptpaddr) in the response payload

    def state(self):
        return (self.last_ts, self.kept and self.kept[:3] + (dict(self.kept[3]),), self.hs)

    def receive_initiation_part(self, d):
        """§3.4 "Receiving an initiation part", steps 1-5. Returns None while a part is
        missing, the initiator's payload once both are there and pass; raises ProtocolError
        on a drop or a refusal."""
        # 1. size, version, type, part
        if len(d) != INIT_PART_SIZE or d[0] != VERSION or d[1] != TYPE_INITIATION or d[2] not in (0, 1):
            raise ProtocolError("bad size/version/type/part")
        # 2. mac, under the current key, else the old one
        body, mac = d[:INIT_PART_SIZE - MAC_SIZE], d[INIT_PART_SIZE - MAC_SIZE:]
        for slot, (_psk, mac_key) in enumerate(self.keys):
            if hmac.compare_digest(mac, mac16(mac_key, body)):
                break
        else:
            raise ProtocolError("bad mac")
        _v, _t, part, _r, sender, ts = struct.unpack(">BBBBIQ", d[:INIT_HEADER_SIZE])
        # 3. freshness (tokxts is not modelled)
        if ts <= self.last_ts:
            raise ProtocolError("stale timestamp")
        # 4. keep
        k = self.kept
        if k is None or ts > k[0] or (ts == k[0] and sender == k[1] and slot != k[2]):
            self.kept = k = (ts, sender, slot, {})
        elif ts < k[0]:
            raise ProtocolError("part of an initiation older than the one kept")
        elif sender != k[1]:
            raise ProtocolError("part of another initiation with the same timestamp")
        elif part in k[3]:
            raise ProtocolError("copy of a kept part")
        k[3][part] = d
        if len(k[3]) < 2:
            return None
        # 5. join, decrypt, encapsulation key check, payload (on failure forget the parts)
        self.kept = None
        parts = k[3]
        msg1 = b"".join(parts[p][INIT_HEADER_SIZE:INIT_PART_SIZE - MAC_SIZE] for p in (0, 1))
        psk = self.keys[k[2]][0]
        header0 = struct.pack(">BBBBIQ", VERSION, TYPE_INITIATION, 0, 0, k[1], k[0])  # §3: built from the fields
        hs = HandshakeState(NOISE_NAME_V2, PATTERN_V2, PROLOGUE_V2 + header0, psk,
                            e_priv=self.e_priv, kem_m=self.kem_m)
        pl = parse_payload(hs.read_message(0, msg1))
        payload_acceptable(pl, self.ipaddr, self.ptpaddr)
        cipher = choose_cipher(pl["ciphers"], self.ciphers)
        self.hs, self.slot, self.peer_index, self.peer_ts = hs, k[2], sender, ts
        self.cipher, self.peer_payload = cipher, pl
        return pl

    def response(self):
        """§3.4 step 6: X25519, DH, encapsulation, the two response parts."""
        hs, self.hs = self.hs, None
        chosen = self.force_cipher or self.cipher
        addrs = self.claim or (self.ipaddr, self.ptpaddr)
        msg2 = hs.write_message(1, build_payload(chosen, self.mtu, *addrs))
        check(len(msg2) == NOISE_MSG2_SIZE, "Noise message 2 size")
        mac_key = self.keys[self.slot][1]
        parts = tuple(make_part(mac_key, resp_header(p, self.index, self.peer_index),
                                msg2[p * MSG2_HALF:(p + 1) * MSG2_HALF]) for p in (0, 1))
        check(all(len(p) == RESP_PART_SIZE for p in parts), "response part size")
        self.last_ts = self.peer_ts
        self.k1, self.k2 = hs.split()
        self.kem_ct, self.kem_ss = hs.kem_ct, hs.kem_ss
        return parts


# =======================================================================================
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


# =======================================================================================
# §10: one version-1 initiation (116 bytes, Noise NNpsk0, v1 labels)

V1_INITIATION_SIZE = 116


def v1_initiation(link_key, index, timestamp, e_priv, payload):
    """The version-1 construction (from the version-1 document; §10 of the version-2 one
    gives only its size, version, type and mac): header version 1, type 1, 2 reserved bytes,
    sender index, timestamp; Noise NNpsk0 message 1 (84 bytes) under prologue
    "ciped v1" || header; mac = first 16 bytes of HMAC(v1 macKey, bytes 0-99)."""
    psk, mac_key = derive_keys(link_key, version=1)
    header = struct.pack(">BBHIQ", 1, TYPE_INITIATION, 0, index, timestamp)
    hs = HandshakeState(NOISE_NAME_NNPSK0, PATTERN_NNPSK0, b"ciped v1" + header, psk, e_priv=e_priv)
    body = header + hs.write_message(0, payload)
    return body + mac16(mac_key, body)


def v1_recognised(link_key, d):
    """§10: what a version-2 peer recognises (and logs) of a version-1 initiation."""
    v1_mac_key = hmac256(link_key, b"ciped v1 mac")
    return (len(d) == V1_INITIATION_SIZE and d[0] == 1 and d[1] == TYPE_INITIATION
            and hmac.compare_digest(d[100:116], hmac256(v1_mac_key, d[:100])[:16]))


# =======================================================================================
# Test helpers

def must_fail(fn, *args):
    try:
        fn(*args)
    except ProtocolError as e:
        return str(e)
    raise SelfCheckFailed("a bad message was accepted by %s" % getattr(fn, "__name__", fn))


def flip(msg, i):
    b = bytearray(msg)
    b[i] ^= 0x01
    return bytes(b)


def remac(mac_key, d):
    return d[:-MAC_SIZE] + mac16(mac_key, d[:-MAC_SIZE])


def set_byte(msg, i, v):
    return msg[:i] + bytes([v]) + msg[i + 1:]


# =======================================================================================
# Vectors (§9)

LINK_KEY = bytes(range(16))
INIT_E = bytes.fromhex("893e28b9dc6ca8d611ab664754b8ceb7bac5117349a4439a6b0569da977c464a")
RESP_E = bytes.fromhex("bbdb4cdbd309f1a1f2e1456967fe288cadd6f712d65dc7b7793d5e63da6b375b")
KEM_D = bytes(range(0x40, 0x60))
KEM_Z = bytes(range(0x60, 0x80))
KEM_M = bytes(range(0x80, 0xa0))
INNER = bytes.fromhex("45000021000040004001f56e0a0000010a00000208004d5168656c6c6f")  # used as given (29 bytes)

EXCHANGES = [
    # name, init index, timestamp, resp index, responder's accepted ciphers, expected choice
    ("A", 0x11223344, 1795000000123456789, 0x55667788, CIPHER_CHACHA, CIPHER_CHACHA),
    ("B", 0x11223345, 1795000000123456790, 0x55667789, CIPHER_CHACHA | CIPHER_AESGCM, CIPHER_AESGCM),
]


def out(name, value):
    print("%s = %s" % (name, value.hex()))


def make_initiator(keys, i_index, ts, **kw):
    ini = Initiator(keys, i_index, ts, INIT_E, (KEM_D, KEM_Z), 0x03, 1440, "10.0.0.1", "10.0.0.2")
    for k, v in kw.items():
        setattr(ini, k, v)
    return ini


def make_responder(keys, r_index, r_ciphers, **kw):
    return Responder(keys, r_index, RESP_E, KEM_M, r_ciphers, 1420, "10.0.0.2", None, **kw)


def feed(receiver_fn, parts):
    """Deliver parts in order; the last must complete, the others must be kept."""
    for p in parts[:-1]:
        check(receiver_fn(p) is None, "a lone part completes nothing")
    r = receiver_fn(parts[-1])
    check(r is not None, "both parts complete the message")
    return r


def run_exchange(keys, name, i_index, ts, r_index, r_ciphers, expect_cipher):
    _psk, mac_key = keys
    ini = make_initiator(keys, i_index, ts)
    res = make_responder(keys, r_index, r_ciphers)
    i0, i1 = ini.initiation()

    # --- responder side (§3.4, initiation parts)
    before = res.state()
    for part in (i0, i1):
        for i in (0, 1, 2, 3, 5, 10, 15, 16, 40, 300, 657, 658, 673):
            # version, type, part, reserved, index, timestamp (2), body (4), mac (2)
            must_fail(res.receive_initiation_part, flip(part, i))
        must_fail(res.receive_initiation_part, part[:-1])                 # size
        must_fail(res.receive_initiation_part, part + b"\x00")
        must_fail(res.receive_initiation_part, remac(b"\x00" * 32, part))  # wrong-key mac
        for i, v in ((0, 1), (0, 3), (1, 2), (1, 3), (2, 2), (2, 0xff)):   # version, type, part (re-mac'd)
            check("version/type/part" in must_fail(res.receive_initiation_part, remac(mac_key, set_byte(part, i, v))),
                  "initiation part with a bad version/type/part refused at step 1")
    wrong_keys = derive_keys(bytes(16))
    must_fail(res.receive_initiation_part, make_initiator(wrong_keys, i_index, ts).initiation()[0])
    check(res.state() == before, "refused initiation parts change nothing")

    check(res.receive_initiation_part(i0) is None, "part 0 kept")
    check("copy" in must_fail(res.receive_initiation_part, i0), "a copy of part 0 is dropped")
    pl = res.receive_initiation_part(i1)
    check(pl is not None, "initiation complete")
    check(pl["ciphers"] == 0x03 and pl["mtu"] == 1440, "initiation payload ciphers / mtu")
    check(pl["addr"] == addr16("10.0.0.1") and pl["expects"] == addr16("10.0.0.2"), "initiation payload addresses")
    check(res.peer_index == i_index and res.peer_ts == ts and res.cipher == expect_cipher, "initiation fields")

    # the same initiation, parts in reverse order, with a copy of part 1 in between
    res_rev = make_responder(keys, r_index, r_ciphers)
    check(res_rev.receive_initiation_part(i1) is None, "part 1 kept first")
    check("copy" in must_fail(res_rev.receive_initiation_part, i1), "a copy of part 1 is dropped")
    check(res_rev.receive_initiation_part(i0) == pl, "reverse order gives the same payload")

    r0, r1 = res.response()
    check(res_rev.response() == (r0, r1), "reverse order gives the same response")
    for part in (i0, i1):                                   # replay after the exchange
        check("stale" in must_fail(res.receive_initiation_part, part), "replayed initiation part refused")

    # --- initiator side (§3.4, response parts)
    before = ini.state()
    for part in (r0, r1):
        for i in (0, 1, 2, 3, 5, 9, 11, 12, 40, 300, 605, 606, 621):
            # version, type, part, reserved, sender, receiver (2), body (4), mac (2)
            must_fail(ini.receive_response_part, flip(part, i))
        must_fail(ini.receive_response_part, part[:-1])
        for i, v in ((0, 1), (0, 3), (1, 1), (1, 3), (2, 2), (2, 0xff)):   # version, type, part (re-mac'd)
            check("version/type/part" in must_fail(ini.receive_response_part, remac(mac_key, set_byte(part, i, v))),
                  "response part with a bad version/type/part refused at step 1")
        must_fail(ini.receive_response_part, remac(b"\x00" * 32, part))   # wrong-key mac
    check(ini.state() == before, "refused response parts change nothing")

    # altered by a holder of the link key (re-mac'd): parts kept, then decryption fails,
    # and the initiation is still waited on
    for pos in (12 + 5, 12 + 100, 12 + 593):
        bad = remac(mac_key, flip(r1, pos))
        check(ini.receive_response_part(r0) is None, "response part 0 kept")
        must_fail(ini.receive_response_part, bad)
        check(ini.waiting and ini.kept is None, "failed response: parts forgotten, initiation still waited on")
    # a response part of another sender index replaces the one kept
    other = remac(mac_key, r1[:4] + struct.pack(">I", r_index ^ 0xff) + r1[8:])
    check(ini.receive_response_part(other) is None, "response part kept")
    check(ini.receive_response_part(r1) is None, "a part of another sender index replaces what was kept")
    check("copy" in must_fail(ini.receive_response_part, r1), "a copy of a response part is dropped")
    pl = ini.receive_response_part(r0)                     # reverse order: part 1, then part 0
    check(pl is not None, "response complete")
    check(pl["ciphers"] == expect_cipher and pl["mtu"] == 1420, "response payload ciphers / mtu")
    check(pl["addr"] == addr16("10.0.0.2") and pl["expects"] == ZERO16, "response payload addresses")
    check(ini.peer_index == r_index and ini.cipher == expect_cipher, "response fields")
    check((ini.k1, ini.k2) == (res.k1, res.k2) and ini.k1 != ini.k2, "split keys agree")
    check((ini.kem_ct, ini.kem_ss) == (res.kem_ct, res.kem_ss), "KEM ciphertext / secret agree")
    for part in (r0, r1):                                   # replay after the exchange
        must_fail(ini.receive_response_part, part)

    # in order, by a second initiator with the same inputs
    ini2 = make_initiator(keys, i_index, ts)
    check(ini2.initiation() == (i0, i1), "the initiation is deterministic")
    feed(ini2.receive_response_part, (r0, r1))
    check((ini2.k1, ini2.k2) == (ini.k1, ini.k2), "in-order response gives the same keys")

    # --- data (§4)
    c = expect_cipher
    d1 = seal_data(c, ini.k1, r_index, 0, 0, INNER)
    d2 = seal_data(c, ini.k1, r_index, 1, FLAG_PING, b"")
    d3 = seal_data(c, res.k2, i_index, 0, 0, INNER)

    at_responder = {r_index: (res.cipher, res.k1)}
    at_initiator = {i_index: (ini.cipher, ini.k2)}
    check(open_data(at_responder, d1) == (0, 0, INNER), "data1 opens")
    check(open_data(at_responder, d2) == (FLAG_PING, 1, b""), "data2 opens")
    check(open_data(at_initiator, d3) == (0, 0, INNER), "data3 opens")
    for i in (0, 1, 2, 3, 7, 15, 16, len(d1) - 1):   # version, type, flags, reserved, index, counter, ct, tag
        must_fail(open_data, at_responder, flip(d1, i))
    # well-sealed messages with a bad header: version 1, type 4, an unknown flag
    for hdr in (struct.pack(">BBBBIQ", 1, TYPE_DATA, 0, 0, r_index, 2),
                struct.pack(">BBBBIQ", VERSION, 4, 0, 0, r_index, 2),
                struct.pack(">BBBBIQ", VERSION, TYPE_DATA, 0x20, 0, r_index, 2)):
        bad = hdr + aead(c, ini.k1).encrypt(data_nonce(2), INNER, hdr)
        check("version/type/flags" in must_fail(open_data, at_responder, bad), "bad data header refused")
    ok = struct.pack(">BBBBIQ", VERSION, TYPE_DATA, KNOWN_FLAGS, 0xff, r_index, 2)
    check(open_data(at_responder, ok + aead(c, ini.k1).encrypt(data_nonce(2), b"", ok))[0] == KNOWN_FLAGS,
          "every known flag and a non-zero reserved byte are accepted")
    must_fail(open_data, at_initiator, d1)             # wrong direction
    check(len(d1) == 32 + len(INNER) and len(d2) == 32, "data sizes")

    out(name + ".initiation.0", i0)
    out(name + ".initiation.1", i1)
    out(name + ".response.0", r0)
    out(name + ".response.1", r1)
    out(name + ".kem.ct", res.kem_ct)
    out(name + ".kem.ss", res.kem_ss)
    out(name + ".k1", ini.k1)
    out(name + ".k2", ini.k2)
    out(name + ".data1", d1)
    out(name + ".data2", d2)
    out(name + ".data3", d3)
    return (i0, i1)


def exchange_checks(keys, initiations):
    """§3.4 checks that need more than one exchange's datagrams, or a misbehaving peer."""
    _psk, mac_key = keys
    (a0, a1), (b0, b1) = initiations
    _, a_index, a_ts, r_index, _, _ = EXCHANGES[0]
    _, b_index, b_ts, _, _, _ = EXCHANGES[1]
    both = CIPHER_CHACHA | CIPHER_AESGCM

    # step 4: a greater timestamp replaces what was kept; a smaller one is dropped
    res = make_responder(keys, r_index, both)
    check(res.receive_initiation_part(a0) is None, "A part 0 kept")
    check(res.receive_initiation_part(b0) is None, "B part 0 replaces A part 0")
    check("older" in must_fail(res.receive_initiation_part, a1), "A part 1 dropped (smaller timestamp)")
    check(res.receive_initiation_part(b1)["ciphers"] == 0x03 and res.peer_index == b_index, "B completes")
    res.response()
    for part in (a0, a1, b0, b1):
        check("stale" in must_fail(res.receive_initiation_part, part), "older initiations refused after B")

    # step 5: parts altered and re-mac'd by a holder of the link key fail decryption: the
    # prologue binds index and timestamp; the X25519 key, encapsulation key and payload are
    # under the AEAD. On failure the parts are forgotten.
    def altered(pos_hdr=None, part=None, pos=None):
        p = [a0, a1]
        if pos_hdr is not None:
            p = [remac(mac_key, flip(x, pos_hdr)) for x in p]
        if part is not None:
            p[part] = remac(mac_key, flip(p[part], pos))
        return p
    for pos_hdr, part, pos in ((7, None, None), (15, None, None), (None, 0, 16), (None, 0, 100),
                               (None, 1, 16), (None, 1, 600), (None, 1, 657)):
        res = make_responder(keys, r_index, both)
        p = altered(pos_hdr, part, pos)
        check(res.receive_initiation_part(p[0]) is None, "altered part kept")
        check("decryption" in must_fail(res.receive_initiation_part, p[1]), "altered initiation refused")
        check(res.kept is None and res.last_ts == 0, "refused initiation: parts forgotten, timestamp not recorded")
        check(feed(res.receive_initiation_part, (a0, a1)) is not None, "the genuine initiation still passes")

    # a responder with another psk but the same macKey: the mac passes, decryption fails
    res = make_responder((hmac256(b"other", b"psk"), mac_key), r_index, both)
    check(res.receive_initiation_part(a0) is None, "part kept")
    check("decryption" in must_fail(res.receive_initiation_part, a1), "wrong psk refused")

    # the old key of a rotation (§2): parts under it are accepted and answered under it
    old = derive_keys(bytes(range(16, 32)))
    o0, o1 = make_initiator(old, a_index, a_ts).initiation()
    res = make_responder(keys, r_index, both, old_keys=old)
    check(res.receive_initiation_part(o0) is None, "old-key part kept")
    check(res.receive_initiation_part(a1) is None, "a part under the other key replaces it")
    check(res.receive_initiation_part(a0) is not None and res.slot == 0, "current-key initiation completes")
    res = make_responder(keys, r_index, both, old_keys=old)
    feed(res.receive_initiation_part, (o0, o1))
    ini = make_initiator(old, a_index, a_ts)
    ini.initiation()
    feed(ini.receive_response_part, res.response())
    check((ini.k1, ini.k2) == (res.k1, res.k2), "old-key exchange completes under the old key")

    # an encapsulation key with a coefficient >= 3329 is refused (FIPS 203 §7.2)
    ek, _ = mlkem_keygen_internal(KEM_D, KEM_Z)
    for value in (Q, 4095):
        ini = make_initiator(keys, a_index, a_ts, ek_override=_set_coefficient(ek, 700, value))
        res = make_responder(keys, r_index, both)
        check(res.receive_initiation_part(ini.initiation()[0]) is None, "part kept")
        check("7.2" in must_fail(res.receive_initiation_part, ini.initiation()[1]), "bad encapsulation key refused")
        check(res.kept is None, "refused: parts forgotten")

    # a low-order X25519 key passes step 5 but ends the exchange at the DH (§3 message 2)
    ini = make_initiator(keys, a_index, a_ts, e_pub_override=b"\x00" * 32)
    res = make_responder(keys, r_index, both)
    check(feed(res.receive_initiation_part, ini.initiation()) is not None, "low-order key: step 5 passes")
    check("all zero" in must_fail(res.response), "low-order key: the exchange ends")

    # payload rules (§3.3) on the initiation, at step 5
    for kw in ({"ipaddr": "10.0.0.2"},            # reflected: our own address
               {"ptpaddr": "10.0.0.9"},           # expects an address that is not ours
               {"ipaddr": "fd00::1"},             # another IP version
               {"ipaddr": "127.0.0.1"},           # to be learned: loopback
               {"ipaddr": "224.0.0.1"},           # multicast
               {"ipaddr": "169.254.1.1"},         # link-local
               {"ipaddr": "255.255.255.255"},     # broadcast
               {"ipaddr": "0.0.0.0"},             # unspecified
               {"ciphers": 0x04}):                # no common cipher (unknown bit only)
        ini = make_initiator(keys, a_index, a_ts, **kw)
        res = make_responder(keys, r_index, both)
        must_fail(feed, res.receive_initiation_part, ini.initiation())
    ini = make_initiator(keys, a_index, a_ts, ciphers=0xfd)   # unknown bits are ignored
    res = make_responder(keys, r_index, both)
    check(feed(res.receive_initiation_part, ini.initiation()) is not None and res.cipher == CIPHER_CHACHA,
          "unknown cipher bits ignored")
    # a responder with a ptpaddr refuses another address
    res = Responder(keys, r_index, RESP_E, KEM_M, both, 1420, "10.0.0.2", "10.0.0.7")
    must_fail(feed, res.receive_initiation_part, (a0, a1))
    # the learned-before rule and the rules checked directly
    pl = parse_payload(build_payload(0x03, 1440, "10.0.0.1", None))
    payload_acceptable(pl, "10.0.0.2", None, learned=addr16("10.0.0.1"))
    must_fail(payload_acceptable, pl, "10.0.0.2", None, addr16("10.0.0.3"))
    must_fail(payload_acceptable, parse_payload(build_payload(0x03, 1440, "fe80::1", None)), "fd00::2", None)
    payload_acceptable(parse_payload(build_payload(0x03, 1440, "fd00::1", "fd00::2")), "fd00::2", None)

    # cipher choice on the response: not exactly one offered bit is refused, and the
    # initiation is still waited on
    for forced, offered in ((CIPHER_AESGCM, CIPHER_CHACHA), (0x03, 0x03), (0x04, 0x03)):
        ini = make_initiator(keys, a_index, a_ts, ciphers=offered)
        res = make_responder(keys, r_index, both)
        feed(res.receive_initiation_part, ini.initiation())
        res.force_cipher = forced
        check("cipher" in must_fail(feed, ini.receive_response_part, res.response()), "bad cipher choice refused")
        check(ini.waiting, "initiation still waited on")
    # the payload rules on the response: the initiator's own address (reflected), an
    # address that is not the initiator's ptpaddr, an expectation that is not its ipaddr
    for claim in (("10.0.0.1", None), ("10.0.0.9", None), ("10.0.0.2", "10.0.0.3")):
        ini = make_initiator(keys, a_index, a_ts)
        res = make_responder(keys, r_index, both)
        feed(res.receive_initiation_part, ini.initiation())
        res.claim = claim
        must_fail(feed, ini.receive_response_part, res.response())
        check(ini.waiting, "initiation still waited on")

    # a response for another initiation (wrong receiver index) is refused at step 2
    ini = make_initiator(keys, b_index, b_ts)
    ini.initiation()
    res = make_responder(keys, r_index, both)
    feed(res.receive_initiation_part, (a0, a1))
    for part in res.response():
        check("receiver index" in must_fail(ini.receive_response_part, part), "response to another initiation refused")


def main():
    noise_selftest()
    psk, mac_key = derive_keys(LINK_KEY)
    out("psk", psk)
    out("mackey", mac_key)
    out("kem.ek", mlkem_selftest(KEM_D, KEM_Z, KEM_M))
    keys = (psk, mac_key)
    initiations = [run_exchange(keys, *ex) for ex in EXCHANGES]
    exchange_checks(keys, initiations)

    # §10: one version-1 initiation under the same link key, exchange A's inputs
    _, a_index, a_ts, _, _, _ = EXCHANGES[0]
    v1_payload = build_payload(0x03, 1440, "10.0.0.1", "10.0.0.2")
    v1 = v1_initiation(LINK_KEY, a_index, a_ts, INIT_E, v1_payload)
    check(len(v1) == V1_INITIATION_SIZE and v1_recognised(LINK_KEY, v1), "v1 initiation recognised (§10)")
    check(not v1_recognised(bytes(16), v1) and not v1_recognised(LINK_KEY, flip(v1, 50)), "v1 mac checked")
    v1_psk, _ = derive_keys(LINK_KEY, version=1)
    hs = HandshakeState(NOISE_NAME_NNPSK0, PATTERN_NNPSK0, b"ciped v1" + v1[:16], v1_psk, e_priv=RESP_E)
    check(hs.read_message(0, v1[16:100]) == v1_payload, "v1 initiation decrypts as NNpsk0")
    must_fail(make_responder(keys, 1, CIPHER_CHACHA).receive_initiation_part, v1)
    out("v1.initiation", v1)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (SelfCheckFailed, AssertionError, ProtocolError) as exc:
        sys.stdout.flush()
        note("SELF-CHECK FAILED: %s" % (exc,))
        sys.exit(1)
