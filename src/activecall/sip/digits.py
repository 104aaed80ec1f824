"""The one test for "a number" in SIP and SDP text.

``str.isdigit()`` also accepts ``'²'`` (which ``int()`` refuses: ValueError) and ``'٥'`` (which
``int()`` reads as 5); a peer's number is ASCII digits or it is malformed.  No imports: both
``message.py`` and ``sdp.py`` use it.
"""


def is_number(text: str) -> bool:
    """True for a non-empty string of ASCII digits ``0-9`` only."""
    return text.isascii() and text.isdigit()
