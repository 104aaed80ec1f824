"""Prometheus metrics for one daemon instance (its own registry, so tests can
run several daemons in one process)."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST


class Metrics:
    """The daemon's counters and gauges; later subsystems increment them."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        r = self.registry
        self.calls_active = Gauge(
            "activecall_calls_active", "Calls in progress", ["call_type"], registry=r
        )
        self.calls_total = Counter(
            "activecall_calls", "Calls ended, by type and end reason",
            ["call_type", "reason"], registry=r,
        )
        self.rtp_packets = Counter(
            "activecall_rtp_packets", "RTP packets", ["direction"], registry=r
        )
        self.rtp_inbound_frames_deferred = Counter(
            "activecall_rtp_inbound_frames_deferred",
            "Inbound frames an overloaded media tick played out a tick late (after the next tick's sends)",
            registry=r,
        )
        self.sip_messages = Counter(
            "activecall_sip_messages", "SIP messages", ["direction", "transport"], registry=r
        )
        self.sip_malformed = Counter(
            "activecall_sip_malformed",
            "SIP input dropped or answered 400 as malformed, by reason and transport (docs/sip.md)",
            ["reason", "transport"], registry=r,
        )
        self.errors = Counter("activecall_errors", "Errors, by kind", ["kind"], registry=r)
        self.llm_preemptive = Counter(
            "activecall_llm_preemptive",
            "LLM requests started on a stable partial transcript, by outcome: hit (the final matched, its "
            "answer was used), miss (the final differed: cancelled, asked again), cancelled (the partial "
            "changed or the call moved on before the final)",
            ["outcome"], registry=r,
        )
        self.speculative_speech = Counter(
            "activecall_speculative_speech",
            "A preemptive reply's first sentence synthesised before the end of turn was confirmed, by outcome: "
            "played (the turn was confirmed with the same words: its buffered audio was the reply's start), "
            "wasted (dropped unheard: the caller went on, the final differed, the call moved on)",
            ["outcome"], registry=r,
        )
        self.sip_registration_up = Gauge(
            "activecall_sip_registration_up",
            "1 when the account is registered with its PBX, else 0",
            ["account"], registry=r,
        )
        # admission (activecall/admission.py, docs/scale-out.md)
        self.refused = Counter(
            "activecall_refused",
            "New calls and OPTIONS probes answered 503, by request (invite, options, websocket, "
            "originate) and reason (draining, max_calls, overload)",
            ["request", "reason"], registry=r,
        )
        self.draining = Gauge(
            "activecall_draining", "1 while the node drains (takes no new calls, waits for live ones)",
            registry=r,
        )
        self.event_loop_lag_seconds = Gauge(
            "activecall_event_loop_lag_seconds",
            "How late the event loop runs its timers (smoothed), what max_event_loop_lag is compared with",
            registry=r,
        )
        self.uptime_seconds = Gauge(
            "activecall_uptime_seconds", "Seconds since the daemon started", registry=r
        )
        # leak indicators (bench/bench_soak.py): each returns to its idle value once every call ended
        self.media_clock_legs = Gauge(
            "activecall_media_clock_legs", "Legs the media clock ticks (RTP legs count one each)", registry=r
        )
        self.rtp_ports_in_use = Gauge(
            "activecall_rtp_ports_in_use", "RTP port pairs bound for calls", registry=r
        )
        self.reactor_timers = Gauge(
            "activecall_reactor_timers", "Pending reactor timers (Twisted delayed calls)", registry=r
        )

        # per-turn latency from the end of the caller's speech (call/turn_timing.py, issue 20)
        buckets = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.8, 1.0, 1.5, 2.0, 3.0, 5.0)
        self.turn_stages = {
            field: Histogram(f"activecall_turn_{name}_seconds", help_, buckets=buckets, registry=r)
            for field, name, help_ in (
                ("eou_ms", "eou", "End of the caller's speech to the end-of-turn decision"),
                ("asr_final_ms", "asr_final", "End of the caller's speech to the recogniser's final"),
                ("llm_first_token_ms", "llm_first_token", "End of the caller's speech to the LLM's first token"),
                ("tts_first_audio_ms", "tts_first_audio", "End of the caller's speech to the first TTS samples"),
                ("first_frame_ms", "first_frame",
                 "End of the caller's speech to the first reply frame sent (voice to voice, in the daemon)"),
            )
        }

    def observe_turn(self, data: dict) -> None:
        """One turn's ``turn.latency`` breakdown (ms; None = the stage did not happen)."""
        for field, histogram in self.turn_stages.items():
            value = data.get(field)
            if value is not None:
                histogram.observe(max(0, value) / 1000.0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
