"""A small S3 client: PUT an object into any S3-compatible store, signed with AWS Signature V4.

Only what call records need (``[callrecord] type = "s3"``): one ``PUT`` per object, the payload's
SHA-256 in ``x-amz-content-sha256`` (every S3-compatible store accepts a signed payload; not all
accept ``UNSIGNED-PAYLOAD``).  The signer follows the public AWS specification ("Signature Version 4
signing process": canonical request -> string to sign -> HMAC-SHA256 key chain) in a few plain
functions; tests check it against AWS's published example and against botocore's signer.  botocore
itself is not a dependency: it would pull in its whole service-model tree for a hundred lines.

The secret key is used only to derive the signing key; it is never logged, and neither is the
``Authorization`` header.  This module imports nothing of the daemon but ``httpclient``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from datetime import datetime, timezone
from io import BytesIO
from typing import Callable, Mapping, Optional, Union
from urllib.parse import quote, urlsplit

from twisted.internet import defer, threads
from twisted.python.failure import Failure

from activecall.httpclient import default_http_client

ALGORITHM = "AWS4-HMAC-SHA256"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


class S3Error(Exception):
    """A PUT that failed: no answer, or an answer that is not 2xx (the S3 error code, never a secret)."""


# -- Signature Version 4 -------------------------------------------------------------------------------


def uri_encode_path(path: str) -> str:
    """A path as SigV4 (for S3) and the wire want it: every byte but unreserved ones and ``/`` escaped."""
    return quote(path, safe="/~")


def canonical_request(method: str, path: str, query: str, headers: Mapping[str, str],
                      payload_hash: str) -> tuple[str, str]:
    """(canonical request, signed headers).  ``path`` is already URI-encoded; ``query`` is the
    canonical query string (empty for a PUT); header names are signed lower-cased and sorted, values
    trimmed with inner runs of spaces collapsed."""
    canon = {name.lower(): " ".join(str(value).split()) for name, value in headers.items()}
    names = sorted(canon)
    signed = ";".join(names)
    lines = [method, path or "/", query, "".join(f"{n}:{canon[n]}\n" for n in names), signed, payload_hash]
    return "\n".join(lines), signed


def signing_key(secret_key: str, date: str, region: str, service: str = "s3") -> bytes:
    """kSigning = HMAC(HMAC(HMAC(HMAC("AWS4" + secret, date), region), service), "aws4_request")."""
    key = ("AWS4" + secret_key).encode()
    for part in (date, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


def sign(method: str, url: str, headers: Mapping[str, str], payload_hash: str, access_key: str,
         secret_key: str, region: str, now: datetime, service: str = "s3") -> dict[str, str]:
    """The headers to send: ``headers`` plus ``Host``, ``x-amz-date``, ``x-amz-content-sha256`` and
    ``Authorization``, every one of them signed."""
    parts = urlsplit(url)
    stamp = now.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    date = stamp[:8]
    out = dict(headers)
    out["Host"] = parts.netloc
    out["x-amz-date"] = stamp
    out["x-amz-content-sha256"] = payload_hash
    query = "&".join(sorted(f"{quote(k, safe='~')}={quote(v, safe='~')}" for k, _, v in
                            (q.partition("=") for q in parts.query.split("&") if q)))
    request, signed = canonical_request(method, parts.path or "/", query, out, payload_hash)
    scope = f"{date}/{region}/{service}/aws4_request"
    to_sign = "\n".join([ALGORITHM, stamp, scope, hashlib.sha256(request.encode()).hexdigest()])
    signature = hmac.new(signing_key(secret_key, date, region, service), to_sign.encode(),
                         hashlib.sha256).hexdigest()
    out["Authorization"] = f"{ALGORITHM} Credential={access_key}/{scope},SignedHeaders={signed},Signature={signature}"
    return out


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# -- the client -------------------------------------------------------------------------------------------


class S3Client:
    """PUTs objects into one bucket.

    ``endpoint`` (``https://host[:port]``) gives path-style requests (``endpoint/bucket/key``: MinIO,
    Aliyun, Tencent, DigitalOcean, moto, most S3-compatible stores); without it, AWS's
    virtual-hosted ``https://bucket.s3.region.amazonaws.com/key``.  ``now`` returns the signing time
    (tests fix it); ``run`` runs blocking work (hashing a file) off the reactor thread.
    """

    def __init__(self, bucket: str, access_key: str, secret_key: str, region: str = "us-east-1",
                 endpoint: Optional[str] = None, reactor=None, clock=None, http_client=None,
                 now: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
                 run: Callable[..., defer.Deferred] = threads.deferToThread, timeout: float = 60.0):
        if reactor is None:
            from twisted.internet import reactor
        self.bucket = bucket
        self.region = region or "us-east-1"
        self.endpoint = endpoint.rstrip("/") if endpoint else None
        self._access_key = access_key
        self._secret_key = secret_key
        self.clock = clock or reactor
        self.http = http_client or default_http_client(reactor)
        self.now = now
        self.run = run
        self.timeout = timeout

    def __repr__(self) -> str:  # never the keys
        return f"S3Client(bucket={self.bucket!r}, endpoint={self.endpoint!r}, region={self.region!r})"

    def url_for(self, key: str) -> str:
        path = uri_encode_path(key.lstrip("/"))
        if self.endpoint:
            return f"{self.endpoint}/{uri_encode_path(self.bucket)}/{path}"
        return f"https://{self.bucket}.s3.{self.region}.amazonaws.com/{path}"

    @defer.inlineCallbacks
    def put_object(self, key: str, body: Union[bytes, str], content_type: str = "application/octet-stream"):
        """PUT ``body`` (bytes, or the path of a file, streamed) at ``key``; fires with None or fails
        with ``S3Error``."""
        from twisted.web.client import FileBodyProducer

        if isinstance(body, bytes):
            payload_hash, source = hashlib.sha256(body).hexdigest(), None
        else:
            payload_hash, source = (yield self.run(sha256_file, body)), body
        url = self.url_for(key)
        headers = sign("PUT", url, {"Content-Type": content_type}, payload_hash, self._access_key,
                       self._secret_key, self.region, self.now())
        f = BytesIO(body) if source is None else open(source, "rb")
        try:
            d = self.http.request("PUT", url, data=FileBodyProducer(f),
                                  headers={name: [value] for name, value in headers.items()})
            d.addTimeout(self.timeout, self.clock,
                         onTimeoutCancel=lambda _, t: Failure(S3Error(f"no answer within {t}s")))
            response = yield d
            content = yield response.content()
        finally:
            f.close()
        if not 200 <= response.code < 300:
            raise S3Error(f"HTTP {response.code} {_error_code(content)}".rstrip())
        return None


def _error_code(content: bytes) -> str:
    """The ``<Code>`` of an S3 error document (e.g. ``SignatureDoesNotMatch``), if there is one."""
    start = content.find(b"<Code>")
    end = content.find(b"</Code>", start)
    if start < 0 or end < 0:
        return ""
    return content[start + 6:end][:64].decode("ascii", "replace")

