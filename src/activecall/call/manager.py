"""The registry of live calls: creates sessions with everything they need and
forgets them when they end.  The REST API (/list, /kill) and /health read it."""

from __future__ import annotations

from typing import Callable, Optional

from twisted.internet import defer
from twisted.logger import Logger

from activecall.call.cdr import writer_for
from activecall.call.session import CallSession
from activecall.media.tracks import MediaLoader

log = Logger(namespace="activecall.calls")


class DuplicateSession(Exception):
    """A call with this id is already active."""


class CallManager:
    """Creates, tracks and ends call sessions.

    ``sessions`` is the dict the service exposes as ``calls`` (shared, so the
    REST layer's ``SessionTable`` sees the same objects).
    """

    def __init__(self, config, clock, media_clock, sessions: Optional[dict] = None, metrics=None,
                 synthesizer_for: Optional[Callable] = None, cdr_writer=None, media_loader=None,
                 pending_playbooks=None, processor_factory=None, playbook_starter=None):
        self.config = config
        self.clock = clock
        self.media_clock = media_clock
        self.sessions = sessions if sessions is not None else {}
        self.metrics = metrics
        self.synthesizer_for = synthesizer_for
        self.cdr_writer = cdr_writer if cdr_writer is not None else writer_for(config.callrecord, clock)
        self.media_loader = media_loader or MediaLoader(config.media_cache_path)
        self.pending_playbooks = pending_playbooks
        self.processor_factory = processor_factory
        #: ``(session, source, extras=None) -> runner or None``: runs a playbook on a call (service.py gives
        #: ``activecall.playbook.start.start_playbook``; the call layer does not import the playbook layer)
        self.playbook_starter = playbook_starter
        self.sip_calls = None  # set by the service when SIP runs (refer bridges through it)

    def open_session(self, session_id: str, call_type: str, emit, dump: bool = True,
                     server_track_id: str = "server-side-track") -> CallSession:
        if session_id in self.sessions:
            raise DuplicateSession(f"a call with id {session_id!r} is already active")
        session = CallSession(
            session_id, call_type, clock=self.clock, emit=emit, config=self.config,
            synthesizer_for=self.synthesizer_for, media_loader=self.media_loader,
            cdr_writer=self.cdr_writer, metrics=self.metrics, dump=dump,
            server_track_id=server_track_id, processor_factory=self.processor_factory,
        )
        session.manager = self
        self.sessions[session_id] = session
        session.when_ended().addCallback(self._forget)
        return session

    def _forget(self, session):
        if self.sessions.get(session.id) is session:
            del self.sessions[session.id]

    def start_playbook(self, session, source, extras: Optional[dict] = None):
        """Run playbook ``source`` (a name, inline text, a ``PlaybookFile``) on ``session``.

        None when it cannot run: ``error{sender: "playbook"}`` was sent and the call is ending."""
        return start_playbook(session, source, extras=extras, starter=self.playbook_starter)

    def end_all(self, reason: str = "system") -> defer.Deferred:
        """Daemon shutdown: hang up every call and wait until their CDRs are written."""
        ds = [s.end(reason, initiator="system") for s in list(self.sessions.values())]
        d = defer.DeferredList(ds, consumeErrors=True)
        if self.cdr_writer is not None:
            d.addCallback(lambda _: self.cdr_writer.flush())
        return d


def start_playbook(session, source, extras: Optional[dict] = None, starter: Optional[Callable] = None):
    """Run playbook ``source`` on ``session`` with ``starter``, by default its manager's ``playbook_starter``.

    None when it cannot run: ``error{sender: "playbook"}`` was sent and the call is ending."""
    if starter is None:
        starter = session.manager.playbook_starter if session.manager is not None else None
    if starter is None:
        session.error("playbook", "playbooks are not available here (no playbook starter was configured)")
        session.end("failed", initiator="system")
        return None
    return starter(session, source, extras=extras)
