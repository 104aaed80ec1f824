"""SDES-SRTP: a=crypto make/parse/choose, pylibsrtp sessions, RFC 3711 known answers."""

import base64
import hashlib
import hmac
import struct

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from twisted.trial import unittest

from activecall.media import srtp
from activecall.media.srtp import NoAcceptableCrypto, SdesKey, SrtpContext, SrtpError
from activecall.sip.sdp import Crypto

RFC_KEY = bytes.fromhex("E1F97A0D3E018BE0D64FA32C06DE4139")
RFC_SALT = bytes.fromhex("0EC675AD498AFEEBB6960B3AABE6")


def aes_cm(key: bytes, iv: int, n: int) -> bytes:
    """AES counter mode keystream starting at the 128-bit ``iv`` (RFC 3711 §4.1.1)."""
    enc = Cipher(algorithms.AES(key), modes.CTR(iv.to_bytes(16, "big"))).encryptor()
    return enc.update(b"\0" * n)


def kdf(master_key: bytes, master_salt: bytes, label: int, n: int) -> bytes:
    """RFC 3711 §4.3.1 with index 0 / key_derivation_rate 0."""
    x = int.from_bytes(master_salt, "big") ^ (label << 48)
    return aes_cm(master_key, x << 16, n)


def reference_protect(master: bytes, rtp: bytes, tag_len: int) -> bytes:
    """A minimal independent SRTP (AES-CM + HMAC-SHA1, ROC 0) to check libsrtp against."""
    k, s = master[:16], master[16:]
    ck, ak, cs = kdf(k, s, 0, 16), kdf(k, s, 1, 20), kdf(k, s, 2, 14)
    seq, ssrc = struct.unpack("!H4xI", rtp[2:12])
    iv = (int.from_bytes(cs, "big") << 16) ^ (ssrc << 64) ^ (seq << 16)
    header = rtp[:12]
    body = bytes(a ^ b for a, b in zip(rtp[12:], aes_cm(ck, iv, len(rtp) - 12)))
    tag = hmac.new(ak, header + body + b"\0\0\0\0", hashlib.sha1).digest()[:tag_len]
    return header + body + tag


def rtp_packet(seq=1, ssrc=0x11223344, payload=b"\x55" * 160):
    return struct.pack("!BBHII", 0x80, 0, seq, 160 * seq, ssrc) + payload


class KnownAnswerTests(unittest.TestCase):
    def test_reference_matches_rfc3711_vectors(self):
        # B.2: AES-CM keystream
        ks = aes_cm(bytes.fromhex("2B7E151628AED2A6ABF7158809CF4F3C"),
                    int("F0F1F2F3F4F5F6F7F8F9FAFBFCFD0000", 16), 32)
        self.assertEqual(ks.hex().upper(), "E03EAD0935C95E80E166B16DD92B4EB4D23513162B02D0F72A43A2FE4A5F97AB")
        # B.3: key derivation
        self.assertEqual(kdf(RFC_KEY, RFC_SALT, 0, 16).hex().upper(), "C61E7A93744F39EE10734AFE3FF7A087")
        self.assertEqual(kdf(RFC_KEY, RFC_SALT, 2, 14).hex().upper(), "30CBBC08863D8C85D49DB34A9AE1")
        self.assertEqual(kdf(RFC_KEY, RFC_SALT, 1, 20).hex().upper(), "CEBE321F6FF7716B6FD4AB49AF256A156D38BAA4")

    def test_libsrtp_output_matches_the_reference(self):
        master = RFC_KEY + RFC_SALT
        for suite, tag_len in ((srtp.AES_CM_128_HMAC_SHA1_80, 10), (srtp.AES_CM_128_HMAC_SHA1_32, 4)):
            ctx = SrtpContext(SdesKey(suite, master), SdesKey(suite, master))
            for seq in range(1, 50):
                pkt = rtp_packet(seq, payload=bytes((seq * 7 + i) % 256 for i in range(160)))
                self.assertEqual(ctx.protect(pkt), reference_protect(master, pkt, tag_len), (suite, seq))


class CryptoLineTests(unittest.TestCase):
    def test_new_key_round_trips_through_the_line(self):
        key = srtp.new_key()
        line = key.crypto()
        self.assertEqual(line.suite, "AES_CM_128_HMAC_SHA1_80")
        self.assertEqual(line.tag, 1)
        self.assertTrue(line.key_params.startswith("inline:"))
        self.assertEqual(len(base64.b64decode(line.key_params[7:])), 30)
        self.assertEqual(srtp.parse_key(line), key)
        self.assertNotEqual(srtp.new_key().key, key.key)

    def test_offer_keys_one_per_suite(self):
        keys = srtp.offer_keys()
        self.assertEqual([(k.tag, k.suite) for k in keys],
                         [(1, "AES_CM_128_HMAC_SHA1_80"), (2, "AES_CM_128_HMAC_SHA1_32")])
        self.assertRaises(ValueError, srtp.new_key, "AES_256_CM_HMAC_SHA1_80")

    def test_lifetime_accepted_mki_and_params_refused(self):
        b64 = base64.b64encode(bytes(range(30))).decode()
        self.assertEqual(srtp.parse_key(Crypto(1, srtp.AES_CM_128_HMAC_SHA1_80, f"inline:{b64}|2^20")).key,
                         bytes(range(30)))
        bad = [
            Crypto(1, srtp.AES_CM_128_HMAC_SHA1_80, f"inline:{b64}|2^20|1:4"),
            Crypto(1, srtp.AES_CM_128_HMAC_SHA1_80, f"inline:{b64}", ("UNENCRYPTED_SRTP",)),
            Crypto(1, srtp.AES_CM_128_HMAC_SHA1_80, "inline:" + base64.b64encode(b"short").decode()),
            Crypto(1, srtp.AES_CM_128_HMAC_SHA1_80, "inline:not*base64"),
            Crypto(1, srtp.AES_CM_128_HMAC_SHA1_80, f"uri:{b64}"),
            Crypto(1, srtp.AES_CM_128_HMAC_SHA1_80, f"inline:{b64};inline:{b64}"),
            Crypto(1, "AES_256_CM_HMAC_SHA1_80", f"inline:{b64}"),
        ]
        for line in bad:
            self.assertRaises(SrtpError, srtp.parse_key, line)

    def test_choose_follows_the_offer_order_and_skips_unusable_lines(self):
        a, b = srtp.new_key(srtp.AES_CM_128_HMAC_SHA1_32, 1), srtp.new_key(srtp.AES_CM_128_HMAC_SHA1_80, 2)
        unusable = Crypto(3, "AES_256_CM_HMAC_SHA1_80", a.crypto().key_params)
        self.assertEqual(srtp.choose_crypto([unusable, a.crypto(), b.crypto()]), a)
        self.assertEqual(srtp.choose_crypto([a.crypto(), b.crypto()], suites=[srtp.AES_CM_128_HMAC_SHA1_80]), b)
        self.assertIsNone(srtp.choose_crypto([unusable]))

    def test_answer_uses_their_tag_and_suite(self):
        offered = srtp.offer_keys()
        theirs, ours = srtp.answer_crypto([k.crypto() for k in offered[::-1]])
        self.assertEqual(theirs, offered[1])
        self.assertEqual((ours.tag, ours.suite), (2, srtp.AES_CM_128_HMAC_SHA1_32))
        e = self.assertRaises(NoAcceptableCrypto, srtp.answer_crypto, [])
        self.assertEqual(e.status, 488)

    def test_match_answer(self):
        ours = srtp.offer_keys()
        peer = srtp.new_key(srtp.AES_CM_128_HMAC_SHA1_32, 2)
        mine, theirs = srtp.match_answer(ours, [peer.crypto()])
        self.assertEqual((mine, theirs), (ours[1], peer))
        wrong_suite = srtp.new_key(srtp.AES_CM_128_HMAC_SHA1_32, 1)
        self.assertRaises(NoAcceptableCrypto, srtp.match_answer, ours, [wrong_suite.crypto()])
        self.assertRaises(NoAcceptableCrypto, srtp.match_answer, ours, [])


class SessionTests(unittest.TestCase):
    def pair(self, suite=srtp.AES_CM_128_HMAC_SHA1_80):
        a, b = srtp.new_key(suite), srtp.new_key(suite)
        return SrtpContext(a, b), SrtpContext(b, a)

    def test_rtp_round_trip_both_suites(self):
        for suite, tag in ((srtp.AES_CM_128_HMAC_SHA1_80, 10), (srtp.AES_CM_128_HMAC_SHA1_32, 4)):
            alice, bob = self.pair(suite)
            for seq in range(1, 20):
                pkt = rtp_packet(seq)
                wire = alice.protect(pkt)
                self.assertEqual(len(wire), len(pkt) + tag)
                self.assertNotEqual(wire[12:172], pkt[12:])
                self.assertEqual(bob.unprotect(wire), pkt)
                back = rtp_packet(seq, ssrc=0x99)
                self.assertEqual(alice.unprotect(bob.protect(back)), back)

    def test_rtcp_round_trip(self):
        alice, bob = self.pair(srtp.AES_CM_128_HMAC_SHA1_32)
        rr = struct.pack("!BBHI", 0x80, 201, 1, 0x11223344)
        wire = alice.protect_rtcp(rr)
        self.assertEqual(len(wire), len(rr) + 4 + 10)  # E|index, then an 80-bit tag even for _32
        self.assertEqual(bob.unprotect_rtcp(wire), rr)

    def test_tamper_is_an_error(self):
        alice, bob = self.pair()
        wire = bytearray(alice.protect(rtp_packet(5)))
        wire[40] ^= 1
        self.assertRaises(SrtpError, bob.unprotect, bytes(wire))
        rtcp = bytearray(alice.protect_rtcp(struct.pack("!BBHI", 0x80, 201, 1, 1)))
        rtcp[5] ^= 0x80
        self.assertRaises(SrtpError, bob.unprotect_rtcp, bytes(rtcp))

    def test_replay_and_wrong_key_are_errors(self):
        alice, bob = self.pair()
        wire = alice.protect(rtp_packet(7))
        bob.unprotect(wire)
        self.assertRaises(SrtpError, bob.unprotect, wire)
        stranger = SrtpContext(srtp.new_key(), srtp.new_key())
        self.assertRaises(SrtpError, stranger.unprotect, alice.protect(rtp_packet(8)))
