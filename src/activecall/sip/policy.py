"""Where an outbound call goes and as whom: the ``[[rewrites]]`` rules applied to its target URI, and
the ``[[register_users]]`` credential whose server host is the target's (``UserAgent.place_call``).
"""

from __future__ import annotations

import re
from typing import Sequence

from twisted.logger import Logger

from activecall.sip.message import URI

log = Logger(namespace="activecall.sip.useragent")  # one namespace for the user agent and its calls


def _python_template(rewrite: str) -> str:
    """``$1`` / ``${1}`` (the original's regex crate syntax) as Python's ``\\g<1>``; ``\\1`` stays."""
    out = re.sub(r"\$\{(\w+)\}|\$(\d+)", lambda m: f"\\g<{m.group(1) or m.group(2)}>", rewrite.replace("$$", "\0"))
    return out.replace("\0", "$")


def apply_rewrites(uri: str, rewrites: Sequence) -> str:
    """Each matching ``[[rewrites]]`` rule in order, chained; the first match of each is replaced."""
    for rule in rewrites:
        try:
            pattern = re.compile(rule.match)
        except re.error:
            log.warn("rewrite rule {match!r} is not a valid regex; skipped", match=rule.match)
            continue
        if pattern.search(uri):
            uri = pattern.sub(_python_template(rule.rewrite), uri, count=1)
    return uri


def server_host(server: str) -> str:
    """``sip:pbx.example.com:5060;transport=udp`` -> ``pbx.example.com`` (lower case)."""
    rest = re.sub(r"^sips?:", "", server.strip(), flags=re.IGNORECASE).split(";", 1)[0]
    rest = rest.rsplit("@", 1)[-1]
    if rest.startswith("["):
        return rest[1:rest.find("]")].lower()
    return rest.split(":", 1)[0].lower()


def credentials_for(target: URI, register_users: Sequence):
    """The credential of the first enabled ``[[register_users]]`` entry whose server host is the target's."""
    host = target.host.lower()
    for user in register_users:
        if user.disabled or user.credential is None:
            continue
        if server_host(user.server) == host:
            return user.credential
    return None


__all__ = [
    "apply_rewrites", "server_host", "credentials_for",
]
