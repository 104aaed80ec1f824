"""What a call session needs of the parts a call type brings: its connector and its leg.

A call type (``/call`` WebSocket audio, ``/call/sip``, ``/call/webrtc``) sets ``session.connector``
(the glue between the client's commands and the call type) and, once media flows,
``session.leg``.  Not every call type can do everything: the commands only some of them
understand are separate small interfaces, and the session asks ``providedBy`` before it hands one
over (a command the connector does not provide is an ``error`` event, "not supported on a ... call").

=====================  ========================================  ==========================================
interface              commands                                  provided by
=====================  ========================================  ==========================================
``ICallConnector``     ``invite``, ``accept``, binary frames     ``WebSocketConnector``, ``SipConnector``,
                                                                 ``WebRTCConnector``
``IInboundConnector``  ``ringing``, ``reject``                   ``SipConnector``
``ITransferConnector`` ``refer``                                 all three; ``testing.FakeConnector``
``IDtmfConnector``     ``sendDtmf``                              ``SipConnector``
=====================  ========================================  ==========================================

``ICallLeg``: ``WebSocketAudioLeg``, ``SipLeg``, ``WebRTCLeg``, ``testing.FakeLeg``.  A leg moves audio
through the session's ``IMediaSession`` side (``audio_in``, ``tick``; ``activecall.media.rtp_leg``).
"""

from __future__ import annotations

from zope.interface import Attribute, Interface


class ICallConnector(Interface):
    """The call-type glue every call type has: it starts the call and takes the client's binary frames."""

    def binary_received(payload):
        """A binary WebSocket frame from the client (audio on ``/call``; refused elsewhere)."""

    def invite(command):
        """The ``invite`` command: start the call (dial, answer the browser's offer, or answer at once)."""

    def accept(command):
        """The ``accept`` command: answer a pending inbound call (a call type without them says so)."""


class IInboundConnector(Interface):
    """A call type with inbound calls waiting for the client's decision (SIP)."""

    def ringing(command):
        """The ``ringing`` command: 180 (or early media) on the pending call."""

    def reject(command):
        """The ``reject`` command: refuse the pending call and end the session."""


class ITransferConnector(Interface):
    """A call type whose calls can be transferred (``refer``: a B2BUA bridge or a SIP REFER)."""

    def refer(command):
        """The ``refer`` command."""


class IDtmfConnector(Interface):
    """A call type that can send DTMF to the far end (RFC 4733 on a SIP call's RTP)."""

    def sendDtmf(command):
        """The ``sendDtmf`` command."""


class IMessageConnector(Interface):
    """A call type that carries SIP MESSAGEs (RFC 3428) in its dialog."""

    def sendMessage(command):
        """Send ``command.body`` as a MESSAGE; failures become ``error`` events."""


class ICallLeg(Interface):
    """What a session needs of its media leg."""

    codec = Attribute(
        "The codec the caller's audio travels in (an object with ``name``: pcmu, pcma, g722, opus, pcm...), "
        "or None while it is not negotiated or not known (WebRTC: aiortc's own).  The speech path reads it "
        "to tell narrowband (G.711) from wideband audio.")

    def close():
        """Release the leg's resources (hang up, ports, the peer connection); a Deferred or None."""
