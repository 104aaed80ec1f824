"""Prometheus metrics for one daemon instance (its own registry, so tests can
run several daemons in one process)."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
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
        self.sip_registration_up = Gauge(
            "activecall_sip_registration_up",
            "1 when the account is registered with its PBX, else 0",
            ["account"], registry=r,
        )
        self.uptime_seconds = Gauge(
            "activecall_uptime_seconds", "Seconds since the daemon started", registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
