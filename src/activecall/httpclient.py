"""The daemon's outgoing HTTP client: treq without persistent connections, so nothing lingers after
the request (a webhook per INVITE, a CDR upload, an LLM turn, a playbook's ``<http>``).

This module imports nothing of the daemon's: any layer may use it.
"""

from __future__ import annotations


def default_http_client(reactor):
    """A treq client without persistent connections (nothing lingers after a call)."""
    from treq.client import HTTPClient
    from twisted.web.client import Agent, HTTPConnectionPool

    return HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))
