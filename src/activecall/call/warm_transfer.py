"""A warm (attended) transfer: hold the caller, consult the human, then connect them.

1. The caller hears music on hold (``moh``, a WAV/URL, looped) while the human is dialled as a call of
   its own (an outbound SIP session, ``<caller id>:consult``).
2. The human answers: the summary is spoken to the human only (TTS on the consult call; the caller
   still hears the music).
3. The summary has been played: the two calls are bridged (``call/audio_bridge.py``): ``bridged`` on
   the caller's call.  From then on, either side hanging up ends the other (reason ``refer``).
4. The human declines (a SIP rejection), does not answer within ``timeout`` (30 s), or hangs up
   before the bridge: the music stops, ``reject{refer: true, code}`` goes to the caller's call and the
   call goes back to where it was (a playbook speaks again).

Events on the caller's call: ``ringing{refer: true}``, ``answer{refer: true}`` (the human answered,
the consult begins), ``bridged`` (connected), or ``reject{refer: true}``.
"""

from __future__ import annotations

from typing import Optional

from twisted.logger import Logger

from activecall.call.audio_bridge import bridge_sessions
from activecall.protocol import commands as cmd
from activecall.protocol import events as ev

log = Logger(namespace="activecall.call.warm_transfer")

DEFAULT_TIMEOUT = 30
MOH_PLAY_ID = "warm-transfer-moh"
SUMMARY_PLAY_ID = "warm-transfer-summary"


class WarmTransfer:
    def __init__(self, session, command: cmd.WarmTransfer, on_done=None):
        self.session = session
        self.command = command
        self.on_done = on_done  # (outcome: "bridged" | "failed", code) for the playbook
        self.human = None
        self.state = "new"  # dialing -> consulting -> bridged | failed
        self._timer = None

    # -- start -------------------------------------------------------------------------------------

    def start(self) -> None:
        s = self.session
        manager = s.manager
        sip_calls = manager.sip_calls if manager is not None else None
        if sip_calls is None:
            s.error("warmTransfer", "a warm transfer needs SIP (the daemon has no SIP user agent)")
            self._finish("failed", 503)
            return
        from activecall.call.sip_call import SipConnector, _log_event

        self.state = "dialing"
        s.playback.stop_current(interrupted=True)
        self._hold_music()
        s.listeners.append(self._caller_event)
        try:
            human = manager.open_session(f"{s.id}:consult", "sip", emit=_log_event)
        except Exception as e:
            self._fail(409, str(e))
            return
        self.human = human
        human.connector = SipConnector(human, None, sip_calls)
        parent = s.option or cmd.CallOption()
        c = self.command
        human.option = cmd.CallOption(caller=c.caller or parent.caller, callee=c.callee, tts=parent.tts,
                                      sip=c.sip)
        human.listeners.append(self._human_event)
        timeout = c.timeout if c.timeout is not None else DEFAULT_TIMEOUT
        self._timer = s.clock.callLater(timeout, self._timed_out)
        human.handle(cmd.Invite(option=human.option))

    def _hold_music(self) -> None:
        if self.command.moh:
            self.session.playback.play(self.command.moh, MOH_PLAY_ID)

    # -- the caller's call ---------------------------------------------------------------------------

    def _caller_event(self, event) -> None:
        if isinstance(event, ev.TrackEnd) and event.playId == MOH_PLAY_ID and self.state in ("dialing", "consulting"):
            if self.session.state.value == "answered":
                self.session.clock.callLater(0, self._replay_music)  # loop the music while we wait
        elif isinstance(event, ev.Hangup) or (isinstance(event, ev.End)):
            self._caller_gone()

    def _replay_music(self) -> None:
        if self.state in ("dialing", "consulting") and self.session.playback.current is None:
            self._hold_music()

    def _caller_gone(self) -> None:
        if self.state in ("done", "failed"):
            return
        self.state = "done"
        self._cancel_timer()
        if self.human is not None and self.human.state.value != "ended":
            self.human.end("caller", initiator="caller")

    # -- the human's call ----------------------------------------------------------------------------

    def _human_event(self, event) -> None:
        s = self.session
        if isinstance(event, ev.Ringing) and self.state == "dialing":
            s.emit(ev.Ringing(trackId=s.id, timestamp=s.now(), earlyMedia=event.earlyMedia, refer=True))
        elif isinstance(event, ev.Answer) and self.state == "dialing":
            self.state = "consulting"
            self._cancel_timer()
            s.emit(ev.Answer(trackId=s.id, timestamp=s.now(), sdp=event.sdp, refer=True))
            summary = self.command.summary
            if summary:
                self.human.handle(cmd.Tts(text=summary, playId=SUMMARY_PLAY_ID, endOfStream=True))
            else:
                self._connect()
        elif isinstance(event, ev.TrackEnd) and event.playId == SUMMARY_PLAY_ID and self.state == "consulting":
            self._connect()
        elif isinstance(event, ev.Reject) and self.state == "dialing":
            self._fail(event.code or 480, event.reason or "declined")
        elif isinstance(event, (ev.Hangup, ev.End)):
            if self.state in ("dialing", "consulting"):
                self._fail(487 if self.state == "dialing" else 480, "the human hung up before the bridge")
            elif self.state == "bridged" and s.state.value != "ended":
                self.state = "done"
                s.end("refer", initiator="callee")

    def _connect(self) -> None:
        s = self.session
        if s.state.value != "answered" or self.human.state.value != "answered":
            self._fail(480, "a call ended before the bridge")
            return
        bridge = bridge_sessions(s, self.human)  # the music stops: the bridge track replaces it
        if bridge is None:
            self._fail(500, "the calls could not be bridged")
            return
        self.state = "bridged"
        log.info("warm transfer of {id} to {to}: connected", id=s.id, to=self.command.callee)
        self._finish("bridged", 200)

    # -- failure ----------------------------------------------------------------------------------------

    def _timed_out(self) -> None:
        self._timer = None
        if self.state == "dialing":
            self._fail(408, "no answer")

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _fail(self, code: int, reason: str) -> None:
        if self.state in ("failed", "done", "bridged"):
            return
        self.state = "failed"
        self._cancel_timer()
        s = self.session
        log.info("warm transfer of {id} to {to} failed: {code} {reason}", id=s.id, to=self.command.callee,
                 code=code, reason=reason)
        if self.human is not None and self.human.state.value != "ended":
            self.human.end("canceled" if code in (408, 487) else "system", initiator="system")
        current = s.playback.current
        if current is not None and current.play_id == MOH_PLAY_ID:
            s.playback.stop_current(interrupted=False)
        if s.state.value != "ended":
            s.emit(ev.Reject(trackId=s.id, timestamp=s.now(), reason=reason, code=code, refer=True))
        self._finish("failed", code)

    def _finish(self, outcome: str, code: int) -> None:
        if self._caller_event in self.session.listeners and outcome == "failed":
            self.session.listeners.remove(self._caller_event)
        if self.on_done is not None:
            done, self.on_done = self.on_done, None
            done(outcome, code)


def start_warm_transfer(session, command: cmd.WarmTransfer, on_done=None) -> Optional[WarmTransfer]:
    current = getattr(session, "warm_transfer", None)
    if current is not None and current.state in ("dialing", "consulting"):
        session.error("warmTransfer", "a warm transfer is already in progress", code=491)
        return None
    transfer = WarmTransfer(session, command, on_done)
    session.warm_transfer = transfer
    transfer.start()
    return transfer
