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


def trunk_rule_for(request_uri: str, method: str, rules: Sequence):
    """The first ``[[trunk_rules]]`` entry for ``method`` whose ``match`` is found in ``request_uri``,
    with its match object; (None, None) when none is."""
    for rule in rules:
        if method not in rule.methods:
            continue
        try:
            found = re.search(rule.match, request_uri)
        except re.error:
            continue
        if found:
            return rule, found
    return None, None


def apply_trunk_rules(request, rules: Sequence) -> bool:
    """Rewrite ``request``'s From / To / Contact by the first matching ``[[trunk_rules]]`` entry
    (tags kept).  True when a rule applied."""
    from activecall.sip.message import Address, parse_address

    rule, found = trunk_rule_for(str(request.uri), request.method, rules)
    if rule is None:
        return False

    def address(template: str) -> Address:
        return parse_address(found.expand(_python_template(template))).copy()

    if rule.from_:
        new = address(rule.from_)
        tag = request.from_.params.get("tag")
        if tag:
            new.params["tag"] = tag
        request.headers.set("From", str(new))
    if rule.to:
        new = address(rule.to)
        tag = request.to.params.get("tag")
        if tag:
            new.params["tag"] = tag
        request.headers.set("To", str(new))
    if rule.contact:
        request.headers.set("Contact", str(address(rule.contact)))
    log.debug("trunk rule {match!r} applied to the {method}", match=rule.match, method=request.method)
    return True


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
    "apply_rewrites", "apply_trunk_rules", "trunk_rule_for", "server_host", "credentials_for",
]
