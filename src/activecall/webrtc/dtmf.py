"""RFC 4733 DTMF from a browser (``RTCDTMFSender.insertDTMF``) on a WebRTC call.

aiortc has no telephone-event support: it neither answers the codec (so a
browser never sends DTMF) nor knows what to do with such packets.  Small
additions, made once at import:

* ``telephone-event/48000`` and ``/8000`` join aiortc's audio codec table
  after the real codecs, so an answer keeps the ones the browser offered (it
  offers both; the first common audio codec still carries the voice);
* aiortc's codec-preference filter learns to compare clock rates (two
  telephone-events differ only by it);
* ``RTCRtpReceiver._handle_rtp_packet`` is wrapped: a packet whose payload
  type was negotiated as telephone-event goes to the leg's DTMF hook (our
  own ``DtmfReceiver``: one digit per key press) instead of aiortc's jitter
  buffer and decoder, which would fail on it.

The wrap reaches one private aiortc attribute (the receiver's negotiated
codecs); ``tests/test_webrtc.py`` sends real telephone-event packets through
DTLS-SRTP and the console's browser test presses keys in Chromium, so an
aiortc upgrade that moves it fails loudly there.
"""

from __future__ import annotations

from typing import Callable, Optional

from aiortc import RTCRtpReceiver
from aiortc.codecs import CODECS
from aiortc.rtcrtpparameters import RTCRtpCodecParameters
from twisted.logger import Logger

from activecall.media.dtmf import DtmfReceiver

log = Logger(namespace="activecall.webrtc")

TELEPHONE_EVENT = "audio/telephone-event"
_HOOK = "_activecall_dtmf"


def _install() -> None:
    audio = CODECS["audio"]
    for rate, pt in ((48000, 110), (8000, 126)):  # Chromium's own numbers; the offer's win anyway
        if not any(c.mimeType.lower() == TELEPHONE_EVENT and c.clockRate == rate for c in audio):
            audio.append(RTCRtpCodecParameters(mimeType=TELEPHONE_EVENT, clockRate=rate, channels=1,
                                               payloadType=pt))
    original = RTCRtpReceiver._handle_rtp_packet
    if getattr(original, "_activecall", False):
        return
    _fix_codec_preferences()

    async def _handle_rtp_packet(self, packet, arrival_time_ms):
        codecs = getattr(self, "_RTCRtpReceiver__codecs", {})
        codec = codecs.get(packet.payload_type)
        if codec is not None and codec.mimeType.lower() == TELEPHONE_EVENT:
            hook = getattr(self, _HOOK, None)
            if hook is not None:
                try:
                    hook(packet.payload_type, packet.payload, packet.timestamp)
                except Exception:
                    log.failure("WebRTC DTMF packet could not be handled")
            return
        await original(self, packet, arrival_time_ms)

    _handle_rtp_packet._activecall = True
    RTCRtpReceiver._handle_rtp_packet = _handle_rtp_packet


def _fix_codec_preferences() -> None:
    """aiortc's ``filter_preferred_codecs`` matches a preference by MIME type and parameters but
    not clock rate, so with ``setCodecPreferences`` (``option.codec``) both telephone-event
    preferences pick the same codec and the answer lists one payload type twice.  The same
    function, comparing clock rates too."""
    from aiortc import rtcpeerconnection
    from aiortc.codecs import is_rtx

    def filter_preferred_codecs(codecs, preferred):
        if not preferred:
            return codecs
        rtx_codecs = [c for c in codecs if is_rtx(c)]
        rtx_enabled = any(is_rtx(p) for p in preferred)
        filtered = []
        for pref in (p for p in preferred if not is_rtx(p)):
            for codec in codecs:
                if (codec.mimeType.lower() == pref.mimeType.lower() and codec.clockRate == pref.clockRate
                        and codec.parameters == pref.parameters):
                    filtered.append(codec)
                    if rtx_enabled:
                        filtered += [r for r in rtx_codecs if r.parameters["apt"] == codec.payloadType][:1]
                    break
        return filtered

    rtcpeerconnection.filter_preferred_codecs = filter_preferred_codecs


_install()


def watch(pc, on_digit: Callable[[str], None]) -> None:
    """Send ``on_digit(digit)`` once per key press the peer sends on any of ``pc``'s audio receivers.

    The receivers learn their payload types only when the connection starts;
    the wrapper above checks each packet's against them, so the hook itself
    takes any dynamic payload type."""
    for transceiver in pc.getTransceivers():
        if transceiver.kind != "audio":
            continue
        dtmf = DtmfReceiver(range(96, 128))

        def hook(pt, payload, timestamp, dtmf=dtmf):
            digit: Optional[str] = dtmf.receive(pt, payload, timestamp)
            if digit is not None:
                on_digit(digit)

        setattr(transceiver.receiver, _HOOK, hook)
