"""Digest authentication (activecall.sip.auth): RFC test vectors and client state."""

import hashlib

from twisted.trial import unittest

from activecall.sip import auth
from activecall.sip.message import make_response, parse_message

RFC7616_NONCE = "7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v"
RFC7616_OPAQUE = "FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS"
RFC7616_CNONCE = "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ"

REGISTER = (
    b"REGISTER sip:pbx.example.com SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK1;rport\r\n"
    b"From: <sip:1001@pbx.example.com>;tag=a\r\nTo: <sip:1001@pbx.example.com>\r\n"
    b"Call-ID: reg-1\r\nCSeq: 1 REGISTER\r\nContent-Length: 0\r\n\r\n"
)


def challenge_response(request, *values, proxy=False):
    response = make_response(request, 407 if proxy else 401, to_tag="srv")
    for value in values:
        response.headers.add("Proxy-Authenticate" if proxy else "WWW-Authenticate", str(value))
    return response


class VectorTests(unittest.TestCase):
    def test_rfc2617_example(self):
        challenge = auth.parse_challenge(
            'Digest realm="testrealm@host.com", qop="auth,auth-int", '
            'nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093", opaque="5ccc069c403ebaf9f0171e9517f40e41"'
        )
        self.assertEqual(challenge.qop, ("auth", "auth-int"))
        answer = auth.build_authorization(
            challenge, "Mufasa", "Circle Of Life", "GET", "/dir/index.html", nc=1, cnonce="0a4f113b"
        )
        self.assertEqual(answer.response, "6629fae49393a05397450978507c4ef1")
        self.assertEqual(answer.nc, "00000001")
        self.assertEqual(answer.opaque, "5ccc069c403ebaf9f0171e9517f40e41")

    def _rfc7616(self, algorithm, expected):
        challenge = auth.parse_challenge(
            f'Digest realm="http-auth@example.org", qop="auth, auth-int", algorithm={algorithm}, '
            f'nonce="{RFC7616_NONCE}", opaque="{RFC7616_OPAQUE}"'
        )
        answer = auth.build_authorization(
            challenge, "Mufasa", "Circle of Life", "GET", "/dir/index.html", cnonce=RFC7616_CNONCE
        )
        self.assertEqual(answer.response, expected)
        parsed = auth.parse_authorization(str(answer))
        self.assertEqual(parsed.algorithm, algorithm)
        self.assertTrue(auth.verify_authorization(parsed, "Circle of Life", "GET"))
        self.assertFalse(auth.verify_authorization(parsed, "circle of life", "GET"))
        self.assertFalse(auth.verify_authorization(parsed, "Circle of Life", "POST"))

    def test_rfc7616_md5(self):
        self._rfc7616("MD5", "8ca523f5e9506fed4657c9700eebdbec")

    def test_rfc7616_sha256(self):
        self._rfc7616("SHA-256", "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1")

    def test_legacy_no_qop(self):
        # RFC 2069 form: H(HA1:nonce:HA2), no nc/cnonce on the wire
        challenge = auth.Challenge(realm="r", nonce="n")
        answer = auth.build_authorization(challenge, "u", "p", "INVITE", "sip:b@h")
        self.assertIsNone(answer.cnonce)
        self.assertNotIn("nc=", str(answer))
        def md5(s):
            return hashlib.md5(s.encode()).hexdigest()

        self.assertEqual(answer.response, md5(f"{md5('u:r:p')}:n:{md5('INVITE:sip:b@h')}"))

    def test_sess_and_auth_int_verify(self):
        for algorithm in ("MD5-sess", "SHA-256-sess", "SHA-512-256"):
            for qop in (("auth",), ("auth-int",)):
                challenge = auth.make_challenge("r", algorithm=algorithm.upper(), qop=qop)
                answer = auth.build_authorization(challenge, "u", "p", "INVITE", "sip:b@h", body=b"v=0")
                self.assertEqual(answer.qop, qop[0])
                parsed = auth.parse_authorization(str(answer))
                self.assertTrue(auth.verify_authorization(parsed, "p", "INVITE", body=b"v=0"))
                if qop == ("auth-int",):
                    self.assertFalse(auth.verify_authorization(parsed, "p", "INVITE", body=b"v=1"))


class SyntaxTests(unittest.TestCase):
    def test_challenge_round_trip_and_stale(self):
        challenge = auth.make_challenge("pbx", algorithm="SHA-256", stale=True, opaque="o")
        again = auth.parse_challenge(str(challenge), proxy=True)
        self.assertEqual((again.realm, again.algorithm, again.stale, again.opaque, again.proxy),
                         ("pbx", "SHA-256", True, "o", True))

    def test_algorithm_spelling_echoed(self):
        challenge = auth.parse_challenge('Digest realm="r", nonce="n", algorithm=md5-Sess, qop="auth"')
        self.assertEqual(challenge.base_algorithm, "MD5")
        self.assertTrue(challenge.supported)
        answer = auth.build_authorization(challenge, "u", "p", "REGISTER", "sip:r", cnonce="c")
        self.assertIn("algorithm=md5-Sess,", str(answer))
        parsed = auth.parse_authorization(str(answer))
        self.assertTrue(auth.verify_authorization(parsed, "p", "REGISTER"))
        self.assertEqual(answer.response, auth.digest_response(
            algorithm="MD5-SESS", username="u", realm="r", password="p", method="REGISTER", uri="sip:r",
            nonce="n", qop="auth", nc="00000001", cnonce="c"))

    def test_quoted_commas(self):
        c = auth.parse_challenge('Digest realm="a, b", nonce="x", domain="sip:a sip:b"')
        self.assertEqual(c.realm, "a, b")
        self.assertEqual(c.algorithm, "MD5")

    def test_bad_headers(self):
        for value in ('Basic realm="x"', 'Digest nonce="x"', "Digest realm", "Digest"):
            self.assertRaises(auth.AuthError, auth.parse_challenge, value)
        self.assertRaises(auth.AuthError, auth.parse_authorization, 'Digest username="u"')

    def test_choose_strongest_supported(self):
        challenges = [
            auth.make_challenge("r", algorithm="MD5"),
            auth.make_challenge("r", algorithm="SHA-256"),
            auth.make_challenge("r", algorithm="FOO"),
        ]
        self.assertEqual(auth.choose_challenge(challenges).algorithm, "SHA-256")
        self.assertIsNone(auth.choose_challenge([challenges[2]]))
        self.assertIsNone(auth.choose_challenge([auth.make_challenge("r", qop=("auth-conf",))]))


class ClientTests(unittest.TestCase):
    def setUp(self):
        self.request = parse_message(REGISTER)
        self.client = auth.DigestClient("1001", "secret")

    def test_answers_401_and_server_verifies(self):
        challenge = auth.make_challenge("pbx.example.com")
        self.assertTrue(self.client.authorize(self.request, challenge_response(self.request, challenge)))
        header = auth.parse_authorization(self.request.headers.get("Authorization"))
        self.assertEqual(header.uri, "sip:pbx.example.com")
        self.assertEqual(header.nc, "00000001")
        self.assertTrue(auth.verify_authorization(header, "secret", "REGISTER"))

    def test_407_uses_proxy_authorization(self):
        challenge = auth.make_challenge("proxy")
        self.assertTrue(self.client.authorize(self.request, challenge_response(self.request, challenge, proxy=True)))
        self.assertIsNotNone(self.request.headers.get("Proxy-Authorization"))
        self.assertIsNone(self.request.headers.get("Authorization"))

    def test_second_challenge_means_wrong_password(self):
        self.assertTrue(self.client.authorize(self.request, challenge_response(self.request, auth.make_challenge("r"))))
        self.assertFalse(self.client.authorize(self.request, challenge_response(self.request, auth.make_challenge("r"))))
        self.assertIn("rejected", self.client.last_error)

    def test_stale_is_retried_with_reset_nc(self):
        first = auth.make_challenge("r")
        self.client.authorize(self.request, challenge_response(self.request, first))
        self.client.authorize_again(self.request, first)
        self.assertEqual(auth.parse_authorization(self.request.headers.get("Authorization")).nc, "00000002")
        stale = auth.make_challenge("r", stale=True)
        self.assertTrue(self.client.authorize(self.request, challenge_response(self.request, stale)))
        header = auth.parse_authorization(self.request.headers.get("Authorization"))
        self.assertEqual((header.nonce, header.nc), (stale.nonce, "00000001"))
        self.assertEqual(len(self.request.headers.get_all("Authorization")), 1)

    def test_accepted_starts_a_new_round(self):
        self.client.authorize(self.request, challenge_response(self.request, auth.make_challenge("r")))
        self.client.accepted()
        self.assertTrue(self.client.authorize(self.request, challenge_response(self.request, auth.make_challenge("r"))))

    def test_unsupported_challenge(self):
        response = challenge_response(self.request, 'Basic realm="x"', auth.make_challenge("r", algorithm="X"))
        self.assertFalse(self.client.authorize(self.request, response))
        self.assertEqual(self.client.last_error, "no supported digest challenge")

    def test_nonce_counts_are_per_nonce_and_bounded(self):
        self.assertEqual([self.client.next_nc("a"), self.client.next_nc("a"), self.client.next_nc("b")], [1, 2, 1])
        for i in range(100):
            self.client.next_nc(str(i))
        self.assertEqual(len(self.client._nonce_counts), 32)
        self.assertEqual(self.client.next_nc("99"), 2)
