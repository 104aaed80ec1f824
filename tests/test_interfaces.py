"""The interfaces of what a call swaps or fakes (docs/architecture.md, "Interfaces"): every implementation,
the shared fakes included, provides what it declares; and the session hands a connector only the commands
its interfaces name."""

from __future__ import annotations

import dataclasses
import os

from twisted.internet import defer, task
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from activecall.call.bridge import BridgeTrack, ReferredParty
from activecall.call.cdr import HttpCdrWriter, ICdrWriter, LocalCdrWriter
from activecall.call.interfaces import (
    ICallConnector, ICallLeg, IDtmfConnector, IInboundConnector, IMessageConnector, ITransferConnector,
)
from activecall.call.session import CallSession
from activecall.call.sip_call import SipConnector, SipLeg
from activecall.call.speech import _narrowband
from activecall.call.websocket_call import PcmCodec, WebSocketAudioLeg, WebSocketConnector
from activecall.config import load_config
from activecall.media import codecs
from activecall.media.recorder import IRecorder, WavRecorder
from activecall.media.rtp_leg import IMediaSession, RtpLeg
from activecall.protocol import commands as cmd
from activecall.testing import FakeConnector, FakeLeg, FakeMediaSession, ManualMediaClock


class _SipCall:
    """The one thing a ``SipLeg`` does to its SIP call when it is made: take its offers."""

    offer_answerer = None


class InterfaceTestBase(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.media_clock = ManualMediaClock()
        self.events = []
        root = os.path.abspath(self.mktemp())
        cfg, _ = load_config(None)
        self.cfg = dataclasses.replace(
            cfg, recording=dataclasses.replace(cfg.recording, path=os.path.join(root, "rec")),
            media_cache_path=os.path.join(root, "cache"))
        self.root = root

    def session(self, call_type="webSocket") -> CallSession:
        return CallSession("s1", call_type, clock=self.clock, emit=self.events.append, config=self.cfg,
                           dump=False)

    def rtp_leg(self) -> RtpLeg:
        return RtpLeg(FakeMediaSession(), self.media_clock, self.clock, host="127.0.0.1")


class ConnectorTests(InterfaceTestBase):
    def test_websocket_connector(self):
        connector = WebSocketConnector(self.session(), None, self.media_clock)
        self.assertTrue(verifyObject(ICallConnector, connector))
        self.assertTrue(verifyObject(ITransferConnector, connector))
        self.assertFalse(IInboundConnector.providedBy(connector))
        self.assertFalse(IDtmfConnector.providedBy(connector))
        self.assertFalse(IMessageConnector.providedBy(connector))

    def test_sip_connector(self):
        connector = SipConnector(self.session("sip"), None, None)
        for interface in (ICallConnector, IInboundConnector, ITransferConnector, IDtmfConnector, IMessageConnector):
            self.assertTrue(verifyObject(interface, connector), interface)

    def test_webrtc_connector(self):
        from activecall.webrtc.leg import WebRTCConnector

        connector = WebRTCConnector(self.session("webrtc"), None, self.media_clock, self.cfg)
        self.assertTrue(verifyObject(ICallConnector, connector))
        self.assertTrue(verifyObject(ITransferConnector, connector))
        self.assertFalse(IInboundConnector.providedBy(connector))
        self.assertFalse(IDtmfConnector.providedBy(connector))

    def test_fake_connector(self):
        self.assertTrue(verifyObject(ITransferConnector, FakeConnector()))


class SessionDispatchTests(InterfaceTestBase):
    """A call-type command reaches the connector only through the interface that names it."""

    def errors(self):
        return [e.error for e in self.events if e.TAG == "error"]

    def test_a_command_the_connector_does_not_provide_is_refused(self):
        s = self.session()
        s.connector = FakeConnector()  # transfers, nothing else
        s.handle(cmd.Reject(reason="busy"))
        s.handle(cmd.SendDtmf(digits="1"))
        s.handle(cmd.Invite(option=cmd.CallOption()))
        self.assertEqual(self.errors(), [f"{tag} is not supported on a webSocket call"
                                         for tag in ("reject", "sendDtmf", "invite")])
        s.handle(cmd.Refer(caller="", callee="sip:agent@pbx"))
        self.assertEqual([r.callee for r in s.connector.refers], ["sip:agent@pbx"])
        self.assertTrue(s.can_transfer)

    def test_no_connector(self):
        s = self.session()
        s.handle(cmd.Refer(caller="", callee="sip:agent@pbx"))
        self.assertEqual(self.errors(), ["refer is not supported on a webSocket call"])
        self.assertFalse(s.can_transfer)


class LegTests(InterfaceTestBase):
    def test_websocket_audio_leg(self):
        leg = WebSocketAudioLeg(self.session(), lambda data: None, PcmCodec(8000), self.media_clock)
        self.addCleanup(leg.close)
        self.assertTrue(verifyObject(ICallLeg, leg))

    def test_sip_leg_carries_its_rtp_encoder(self):
        rtp = self.rtp_leg()
        leg = SipLeg(self.session("sip"), _SipCall(), rtp)
        self.assertTrue(verifyObject(ICallLeg, leg))
        self.assertIsNone(leg.codec)  # not negotiated yet
        rtp.encoder = codecs.create("pcma")
        self.assertIs(leg.codec, rtp.encoder)

    def test_webrtc_leg(self):
        from activecall.webrtc.leg import WebRTCLeg

        leg = WebRTCLeg(self.session("webrtc"), self.media_clock, self.cfg, reactor=self.clock)
        self.assertTrue(verifyObject(ICallLeg, leg))
        self.assertIsNone(leg.codec)
        return leg.close()

    def test_fake_leg(self):
        self.assertTrue(verifyObject(ICallLeg, FakeLeg()))
        self.assertTrue(verifyObject(ICallLeg, FakeLeg(codec=codecs.create("pcmu"))))

    def test_the_speech_path_reads_the_legs_codec(self):
        s = self.session("sip")
        self.assertFalse(_narrowband(s))  # no leg yet
        for leg, narrow in ((FakeLeg(), False), (FakeLeg(codecs.create("pcmu")), True),
                            (FakeLeg(codecs.create("pcma")), True), (FakeLeg(codecs.create("g722")), False),
                            (FakeLeg(PcmCodec(8000)), False)):
            s.leg = leg
            self.assertEqual(_narrowband(s), narrow, leg.codec)


class MediaSessionTests(InterfaceTestBase):
    def test_call_session(self):
        self.assertTrue(verifyObject(IMediaSession, self.session()))

    def test_referred_party(self):
        s = self.session()
        self.assertTrue(verifyObject(IMediaSession, ReferredParty(s, BridgeTrack(s.playback.track_id))))

    def test_fake_media_session(self):
        self.assertTrue(verifyObject(IMediaSession, FakeMediaSession()))


class RecorderAndCdrWriterTests(InterfaceTestBase):
    def test_wav_recorder(self):
        recorder = WavRecorder(os.path.join(self.root, "r.wav"))
        self.addCleanup(recorder.close)
        self.assertTrue(verifyObject(IRecorder, recorder))

    def test_local_cdr_writer(self):
        self.assertTrue(verifyObject(ICdrWriter, LocalCdrWriter(os.path.join(self.root, "cdr"))))

    def test_http_cdr_writer(self):
        writer = HttpCdrWriter("http://127.0.0.1:1/cdr", reactor=self.clock, http_client=object())
        self.assertTrue(verifyObject(ICdrWriter, writer))
        self.assertEqual(self.successResultOf(defer.maybeDeferred(writer.flush)), [])
