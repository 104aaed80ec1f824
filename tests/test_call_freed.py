"""A finished call is freed by reference counting, not left for the garbage collector (issue 23 item 6).

The whole daemon runs in this process (``ActiveCallService`` on the test's reactor) and answers sipp's
built-in ``uac`` with a playbook that names no speech providers, so the call gets what the speech defaults
give a real playbook call: a VAD, a recogniser with its end-of-turn detector, the echo guard, a voice,
the playbook runner with its LLM turns, tools and digit collector, the SIP dialog and the RTP leg.  The
collector is off for the whole test: a session that is part of a reference cycle would stay alive.

Two calls: the first one's session is held by the test, which then reads the links that code reads after
a call (the leg's, the runner's, the processors' way back to the session, the CDR's fields); the second's
is held by nobody, and its session, leg, runner and recogniser are gone once the call has ended.  Then the
first is let go and is gone too.
"""

import gc
import os
import types
import weakref

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from activecall.call import manager as manager_mod
from activecall.call.session import CallState
from activecall.config import load_config
from activecall.protocol import events as ev
from activecall.service import ActiveCallService
from tests.helpers import MIN_WAIT, free_port, write_config
from tests.test_sip_integration import sipp, sipp_result, udp_port

PLAYBOOK = """---
llm:
  provider: echo
---
Say what the caller said.
"""


def _later(seconds: float) -> defer.Deferred:
    return task.deferLater(reactor, seconds, lambda: None)


def _describe(referrer) -> str:
    """A referrer for the failure message: a frame says where it is suspended."""
    if isinstance(referrer, types.FrameType):
        held_by = []
        for r in gc.get_referrers(referrer):
            if isinstance(r, types.FrameType):
                held_by.append(f"frame {r.f_code.co_name}:{r.f_lineno} held by "
                               f"{[type(x).__name__ + ':' + getattr(getattr(x, 'f_code', None), 'co_name', '') for x in gc.get_referrers(r)]}")
            else:
                held_by.append(type(r).__name__)
        return f"frame {referrer.f_code.co_name} ({referrer.f_code.co_filename}:{referrer.f_lineno}, held by {held_by})"
    return type(referrer).__name__


class FinishedCallIsFreedTests(unittest.TestCase):
    timeout = 120

    def setUp(self):
        root = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(root, "playbooks"))
        with open(os.path.join(root, "playbooks", "bot.md"), "w") as f:
            f.write(PLAYBOOK)
        self.sip_port = udp_port()
        base = free_port() // 2 * 2
        conf = write_config(self, f'''
addr = "127.0.0.1"
udp_port = {self.sip_port}
tcp_port = 0
http_addr = "127.0.0.1:{free_port()}"
rtp_start_port = {base}
rtp_end_port = {base + 20}
media_cache_path = "{root}/cache"
playbook_dir = "{root}/playbooks"
[recording]
enabled = false
path = "{root}/rec"
[callrecord]
type = "local"
root = "{root}/cdr"
[handler]
type = "playbook"
default = "bot.md"
''')
        config, _ = load_config(conf, None)
        self.service = ActiveCallService(config, reactor=reactor)
        self.service.startService()
        self.addCleanup(self.service.stopService)
        # every session the daemon opens, weakly
        self.opened: list[weakref.ref] = []
        self.held: list = []
        original = manager_mod.CallManager.open_session

        def open_session(manager, *args, **kwargs):
            session = original(manager, *args, **kwargs)
            self.opened.append(weakref.ref(session))
            if len(self.opened) == 2:
                # the second call's teardown may be over (and the session freed) before sipp has
                # reported: the test notes its parts first, then lets it go
                self.held.append(session)
            return session

        manager_mod.CallManager.open_session = open_session
        self.addCleanup(setattr, manager_mod.CallManager, "open_session", original)
        gc.collect()
        gc.disable()
        self.addCleanup(gc.enable)

    def call(self):
        """One sipp call: INVITE, ACK, 6 s (the two-sentence greeting is synthesised and plays), BYE.

        Long enough for the greeting's synthesis to end before the BYE even on a loaded machine: a BYE while
        a synthesis is in flight cancels its Deferred, and Twisted's cancellation leaves a traceback whose
        frames (the teardown's among them) form a cycle only the collector frees: the session then goes at
        the next collection, not at once (seen with 1.5 s calls under load)."""
        uac = sipp(self, f"127.0.0.1:{self.sip_port}", "-p", str(udp_port()), "-mp", str(udp_port() // 2 * 2),
                   "-d", "6000", builtin="uac")
        return sipp_result(uac, timeout=30)

    @defer.inlineCallbacks
    def gone(self, ref: weakref.ref, what: str):
        """Wait until ``ref`` is dead (the collector is off: only reference counting can free it)."""
        for _ in range(int(MIN_WAIT / 0.05) + 1):
            if ref() is None:
                return
            yield _later(0.05)
        raise AssertionError(f"{what} is still alive {MIN_WAIT:.0f} s after the call ended, with the garbage "
                             f"collector off: it is in a reference cycle; referrers: "
                             f"{[_describe(r) for r in gc.get_referrers(ref())]}")

    @defer.inlineCallbacks
    def test_a_finished_call_is_freed_without_the_garbage_collector(self):
        yield self.call()
        self.assertEqual(len(self.opened), 1)
        held = self.opened[0]()
        self.assertIsNotNone(held)
        yield held.when_ended()
        self.assertIs(held.state, CallState.ENDED)

        # the second call: held only by this test (``self.held``, from its opening) until its parts are noted
        yield self.call()
        self.assertEqual(len(self.opened), 2)
        session = self.held.pop()
        self.assertIs(session, self.opened[1]())
        yield session.when_ended()
        parts = {
            "the RTP leg": weakref.ref(session.leg.rtp),
            "the SIP leg": weakref.ref(session.leg),
            "the SIP dialog": weakref.ref(session.leg.sip_call),
            "the SIP connector": weakref.ref(session.connector),
            "the playback": weakref.ref(session.playback),
            "the playbook runner": weakref.ref(session.playbook_runner),
            "the runner's LLM turns": weakref.ref(session.playbook_runner.strategy),
            "the speech processors": weakref.ref(session.processors),
            "the recogniser": weakref.ref(session.processors.recognizer),
            "the VAD": weakref.ref(session.processors.vad),
        }
        self.assertIsNotNone(session.processors.recognizer)  # the speech defaults gave the call one
        ref = weakref.ref(session)
        del session
        yield self.gone(ref, "the second call's CallSession")
        for what, part in parts.items():
            yield self.gone(part, what)

        # the held call: everything code reads after the end is still there, both ways
        leg, runner, processors = held.leg, held.playbook_runner, held.processors
        self.assertIs(leg.session, held)
        self.assertIs(leg.rtp.session, held)
        self.assertIs(held.connector.session, held)
        self.assertIs(runner.session, held)
        self.assertIs(runner.strategy.runner, runner)
        self.assertIs(runner.tools.runner, runner)
        self.assertIs(processors.session, held)
        self.assertIs(held.barge_in.session, held)
        self.assertEqual(held.end_reason, "caller")
        self.assertIsNotNone(held.end_time)
        self.assertTrue(runner.done.called)
        self.assertIn("end", [event.TAG for _, event in held.event_log])
        # the playback's way back to the session (now a weak link) still delivers after the end
        late = ev.Metrics(timestamp=held.now(), key="late", duration=0, data={})
        held.playback.emit(late)
        self.assertIs(held.event_log[-1][1], late)
        ref = weakref.ref(held)
        runner_ref = weakref.ref(runner)
        del held, leg, runner, processors
        yield self.gone(ref, "the first call's CallSession, once let go")
        yield self.gone(runner_ref, "the first call's playbook runner, once let go")
