"""activecall: an AI voice-agent telephony daemon on Twisted."""

__version__ = "0.1.0"
