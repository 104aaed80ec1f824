"""``twistd activecall``: command-line options and the service factory."""

from __future__ import annotations

from twisted.python import usage

from activecall.config import ConfigError, load_config


class Options(usage.Options):
    """The flags of the configuration guide; they override the file."""

    synopsis = "[--conf FILE] [--http ADDR:PORT] [--sip PORT|IP:PORT|IP] [--handler URL|FILE.md] ..."
    longdesc = (
        "Runs the activecall voice-agent daemon. Flags override the TOML file given with --conf; "
        "without --conf the built-in defaults are used."
    )
    optParameters = [
        ["conf", "c", None, "TOML configuration file."],
        ["http", None, None, "HTTP/WebSocket listen address ADDR:PORT (http_addr)."],
        ["sip", None, None, "SIP listen port, IP:PORT or IP (udp_port / addr)."],
        ["handler", None, None, "Inbound call handler: an http(s) webhook URL or a playbook .md file."],
        ["call", None, None, "Place an outbound SIP call to this URI once started."],
        ["external-ip", None, None, "Public IP advertised in SIP and SDP (external_ip)."],
        ["codecs", None, None, "Codec preference, comma separated: pcmu,pcma,g722,opus,telephone_event."],
        ["models-dir", None, "./models", "Directory of offline models no package ships (SenseVoice)."],
        ["download-models", None, None, "Fetch offline models into --models-dir first: sensevoice|supertonic|all."],
    ]
    optFlags = [
        ["exit-after-download", None, "With --download-models: exit once the models are fetched."],
    ]

    def overrides(self) -> dict:
        return {k: self[k] for k in ("http", "sip", "handler", "call", "external-ip", "codecs") if self[k]}


def makeService(options):
    """Load and check the configuration; a bad one stops start-up naming the key."""
    import os

    from activecall.playbook.start import check_configured_playbook
    from activecall.service import build_service
    from activecall.speech import models

    # the speech defaults look for SenseVoice there (speech/defaults.py)
    os.environ["ACTIVECALL_MODELS_DIR"] = os.path.abspath(options["models-dir"])
    if options["download-models"]:
        # an explicit step before start-up, never at call time (docs/speech.md, "Models")
        try:
            models.download(options["download-models"], options["models-dir"])
        except (models.ModelError, OSError) as e:
            raise SystemExit(f"activecall: --download-models: {e}")
        if options["exit-after-download"]:
            raise SystemExit(0)

    try:
        # every configured playbook is read and parsed now: a missing or broken one stops start-up
        config, warnings = load_config(options["conf"], options.overrides(),
                                       check_playbook=check_configured_playbook)
    except ConfigError as e:
        raise SystemExit(f"activecall: configuration error: {e}")
    try:
        return build_service(config, warnings)
    except OSError as e:
        raise SystemExit(
            f"activecall: configuration error: {config.source}: key 'log_file': "
            f"cannot open {config.log_file!r}: {e.strerror}"
        )
