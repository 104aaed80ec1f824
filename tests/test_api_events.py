"""The JSON shapes of server → client events (docs/api.md)."""

from __future__ import annotations

import json
from datetime import datetime, timezone

from twisted.internet import task
from twisted.trial import unittest

from activecall.protocol import events as ev


class SerialisationTests(unittest.TestCase):
    def test_answer_keeps_refer_false_and_tag_first(self):
        e = ev.Answer(trackId="s.1", timestamp=1700000000123, sdp="")
        self.assertEqual(
            json.loads(e.to_json()),
            {"event": "answer", "trackId": "s.1", "timestamp": 1700000000123, "sdp": "", "refer": False},
        )
        self.assertEqual(list(e.to_dict())[0], "event")

    def test_unset_optional_fields_are_left_out_not_null(self):
        e = ev.Reject(trackId="s.1", timestamp=5, reason="no pending call", code=486)
        text = e.to_json()
        self.assertNotIn("null", text)
        self.assertEqual(json.loads(text), {"event": "reject", "trackId": "s.1", "timestamp": 5,
                                            "reason": "no pending call", "code": 486})

    def test_track_start_without_play_id(self):
        self.assertEqual(ev.TrackStart(trackId="s.1", timestamp=1).to_dict(),
                         {"event": "trackStart", "trackId": "s.1", "timestamp": 1})
        self.assertEqual(ev.TrackStart(trackId="server-side-track", timestamp=1, playId="p1").to_dict()["playId"], "p1")

    def test_track_end_fields(self):
        d = ev.TrackEnd(trackId="b", timestamp=9, duration=1500, ssrc=4000000000, playId="x").to_dict()
        self.assertEqual(d, {"event": "trackEnd", "trackId": "b", "timestamp": 9, "duration": 1500,
                             "ssrc": 4000000000, "playId": "x"})

    def test_hangup_uses_the_wire_name_from(self):
        e = ev.Hangup(
            trackId="s.1", timestamp=10, reason="caller", initiator="caller",
            startTime="2025-01-01T00:00:00+00:00", hangupTime="2025-01-01T00:01:00+00:00",
            from_=ev.Attendee(username="alice", realm="example.com", source="sip:alice@example.com"),
            extra={"session_id": "s.1"},
        )
        d = e.to_dict()
        self.assertEqual(d["from"], {"username": "alice", "realm": "example.com", "source": "sip:alice@example.com"})
        self.assertNotIn("from_", d)
        self.assertNotIn("to", d)
        self.assertNotIn("answerTime", d)
        self.assertIs(d["refer"], False)
        self.assertEqual(ev.parse_event(e.to_json()), e)

    def test_every_event_round_trips_through_json(self):
        samples = [
            ev.Ringing(trackId="s", timestamp=1, earlyMedia=True),
            ev.Interruption(trackId="b", timestamp=1, playId="p", subtitle="hi", position=2,
                            totalDuration=3000, current=1200),
            ev.Speaking(trackId="s", timestamp=1, startTime=1, confidence=1.0),
            ev.Silence(trackId="b", timestamp=2, startTime=1, duration=10000),
            ev.AsrDelta(trackId="s", timestamp=1, index=0, text="he"),
            ev.AsrFinal(trackId="s", timestamp=1, index=0, text="hello", startTime=1, endTime=2),
            ev.Transcript(trackId="s", timestamp=1, text="hello", index=0),
            ev.Eou(trackId="s", timestamp=1, completed=True),
            ev.Dtmf(trackId="s", timestamp=1, digit="5"),
            ev.Hold(trackId="s", timestamp=1, onHold=True),
            ev.Inactivity(trackId="s", timestamp=1),
            ev.Metrics(timestamp=1, key="ttfb.asr.x", duration=30, data={"index": 0}),
            ev.Error(trackId="s", timestamp=1, sender="tts", error="boom", code=500),
            ev.AddHistory(sender="s", timestamp=1, speaker="user", text="hi"),
            ev.FunctionCall(trackId="s", callId="c", name="f", arguments="{}", timestamp=1),
            ev.Interrupt(receiver="x"),
            ev.Message(trackId="s", timestamp=1, body="hi", contentType="text/plain"),
            ev.End(trackId="s", timestamp=1, reason="caller"),
            ev.TransferRequest(trackId="s", timestamp=1, referTo="sip:c@x", referredBy="<sip:a@x>",
                               replaces="id;to-tag=1;from-tag=2"),
            ev.AnswerMachineDetection(trackId="s", timestamp=2, startTime=0, endTime=2, text="a long greeting",
                                      result="machine"),
            ev.Bridged(trackId="s", timestamp=1, peer="t", active=False),
        ]
        for e in samples:
            self.assertEqual(ev.parse_event(e.to_json()), e, e)
        self.assertEqual({type(e) for e in samples} | {ev.Answer, ev.Reject, ev.Hangup, ev.TrackStart, ev.TrackEnd},
                         set(ev.EVENTS.values()))

    def test_parse_event_errors(self):
        self.assertRaises(ev.WireError, ev.parse_event, "{")
        self.assertRaises(ev.WireError, ev.parse_event, '{"event":"nope"}')
        with self.assertRaises(ev.WireError) as cm:
            ev.parse_event('{"event":"dtmf","trackId":"s","timestamp":1}')
        self.assertEqual(cm.exception.path, "digit")


class TimeTests(unittest.TestCase):
    def test_now_ms_is_an_integer_from_the_clock(self):
        clock = task.Clock()
        clock.advance(1700000000.1234)
        self.assertEqual(ev.now_ms(clock), 1700000000123)
        self.assertIsInstance(ev.now_ms(clock), int)

    def test_rfc3339_is_utc(self):
        self.assertEqual(ev.rfc3339(0), "1970-01-01T00:00:00+00:00")
        self.assertEqual(ev.rfc3339(datetime(2025, 1, 2, 3, 4, 5, 6000, tzinfo=timezone.utc)),
                         "2025-01-02T03:04:05.006000+00:00")


class HangupReasonTests(unittest.TestCase):
    def test_clean_reason_strings(self):
        table = [
            ((None, None), "system"),
            (("caller", None), "caller"),
            (("ByCaller", None), "caller"),
            (("AUTOHANGUP", None), "autohangup"),
            (("inactivity_timeout", None), "inactivityTimeout"),
            (("cancelled", None), "canceled"),
            (("user hung up", None), "user hung up"),
            (("whatever", "callee"), "callee"),
            (("caller", "nobody"), "caller"),
        ]
        for (reason, initiator), want in table:
            self.assertEqual(ev.hangup_reason(reason, initiator), want, (reason, initiator))
