"""twistd plugin: ``twistd activecall --conf activecall.toml``.

This directory must not contain an ``__init__.py``: ``twisted.plugins`` is a
namespace package that Twisted scans on every ``sys.path`` entry.
"""

from twisted.application.service import ServiceMaker

activecall = ServiceMaker(
    "activecall",
    "activecall.tap",
    "AI voice-agent telephony daemon (SIP, RTP, WebRTC, WebSocket API)",
    "activecall",
)
