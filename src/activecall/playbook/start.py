"""Where playbooks start: loading one for a call (a file, a name, inline text), starting it on a call, and
the start-up check of the configured ones (docs/playbooks.md, "Where it starts").

``start_playbook`` is the one entry point the call paths (/call, SIP, WebRTC, pending playbooks) use; the
call layer does not import it: the composition root (``service.py``) hands it to the ``CallManager`` as its
``playbook_starter``.  ``check_configured_playbook`` is what ``tap.py`` gives ``config.load_config``.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Optional

from twisted.logger import Logger

from activecall.call.handlers import (
    PlaybookFile, PlaybookNameError, resolve_configured_playbook, resolve_playbook)
from activecall.call.session import CallState
from activecall.playbook import front_matter_keys, tags
from activecall.playbook.parser import Playbook, PlaybookError, load_playbook, parse_playbook
from activecall.playbook.runner import PlaybookRunner
from activecall.protocol import commands as cmd
from activecall.speech import defaults as speech_defaults, installed
from activecall.speech.eou.smart_turn import available as smart_turn_available

log = Logger(namespace="activecall.playbook")


def playbook_call_option(playbook: Playbook) -> cmd.CallOption:
    """The playbook's media sections as a CallOption (what an invite inherits when it leaves them out)."""
    config = playbook.config

    def wire(section):
        if section is None:
            return None
        out = {}
        for f in dataclasses.fields(section):
            keys = f.metadata.get("keys")
            value = getattr(section, f.name)
            if not keys or value is None or (hasattr(value, "keys") and not value):
                continue
            out[keys[0]] = dict(value) if hasattr(value, "keys") else value
        return out

    data: dict[str, Any] = {}
    for name in ("asr", "tts", "vad", "recorder", "ambiance", "eou"):
        value = wire(getattr(config, name))
        if value is not None:
            data[name] = value
    _speech_defaults(config, data)
    if "eou" not in data and smart_turn_available():
        data["eou"] = {"type": "smart_turn"}  # semantic end of turn unless the playbook says eou: {type: none}
    if config.denoise is not None:
        data["denoise"] = config.denoise
    if config.extra:
        data["extra"] = dict(config.extra)
    if config.amd is not None:
        data["amd"] = config.amd.timers() or True
    return cmd.CallOption.from_dict(data)


def _speech_defaults(config, data: dict) -> None:
    """A playbook that names no recogniser, voice or VAD gets the defaults for its language
    (``speech/defaults.py``, docs/speech.md "Defaults"): before, one without ``asr:``/``vad:`` was deaf.
    ``asr: {provider: none}`` keeps a call from listening (then no VAD is added either)."""
    asr, tts = config.asr, config.tts
    language = speech_defaults.primary_language(
        config.language, asr.language if asr is not None else None, tts.language if tts is not None else None)
    models_dir = speech_defaults.models_dir_from_env()
    deaf = str((data.get("asr") or {}).get("provider") or "").lower() == speech_defaults.NO_PROVIDER
    if not deaf:
        data["asr"] = speech_defaults.choose("asr", data.get("asr"), language, models_dir)
        if "vad" not in data:
            data["vad"] = speech_defaults.choose("vad", None, language)
    tts_choice = speech_defaults.choose("tts", data.get("tts"), language, models_dir)
    if tts_choice is not None:
        data["tts"] = tts_choice


def load_for_session(session, playbook_or_name) -> Playbook:
    """A ``Playbook``, a ``PlaybookFile`` (a path already decided: the router's, from the
    configuration or confined under ``playbook_dir``), inline text (starting with ``---``) or a
    name under ``config.playbook_dir`` (names from the API: confined there).

    Raises ``PlaybookError`` (bad file or name)."""
    if isinstance(playbook_or_name, Playbook):
        return playbook_or_name
    if isinstance(playbook_or_name, PlaybookFile):
        if not os.path.isfile(playbook_or_name.path):
            raise PlaybookError("playbook not found", playbook_or_name.path)
        return _load_cached(playbook_or_name.path)
    text = str(playbook_or_name)
    if text.lstrip().startswith("---"):
        return parse_playbook(text.lstrip(), "<inline playbook>")
    playbook_dir = session.config.playbook_dir if session.config is not None else "./config/playbook"
    try:
        path = resolve_playbook(playbook_dir, text)
    except PlaybookNameError as e:
        raise PlaybookError(str(e), text) from None
    if not os.path.isfile(path):
        raise PlaybookError("playbook not found", text)
    return _load_cached(path)


_PLAYBOOK_CACHE: dict = {}


def _load_cached(path: str) -> Playbook:
    """Parse a playbook file once per (mtime, size): every call of a busy route shares it
    (parsing per call was a large share of a call's CPU: docs/benchmarks.md); an edited file is
    parsed again."""
    st = os.stat(path)
    key = (path, st.st_mtime_ns, st.st_size)
    playbook = _PLAYBOOK_CACHE.get(key)
    if playbook is None:
        playbook = load_playbook(path)
        if len(_PLAYBOOK_CACHE) > 256:
            _PLAYBOOK_CACHE.clear()
        _PLAYBOOK_CACHE[key] = playbook
    return playbook


def start_playbook(session, playbook_or_name, *, extras: Optional[dict] = None, clock=None,
                   llm_client_factory=None, http=None) -> Optional[PlaybookRunner]:
    """Run a playbook on ``session`` (any call type): load it, give the call its media options, attach.

    The runner picks its turn strategy from the playbook (LLM pipeline or realtime).  Before the answer,
    the playbook's ``asr``/``tts``/``vad``/… become the call's options where the call
    left them out; the runner begins when the call is answered.  A playbook that cannot be loaded sends
    ``error{sender: "playbook"}`` and ends the call; the result is then None.
    """
    existing = session.playbook_runner
    if existing is not None and not existing.stopped:
        session.error("playbook", "a playbook is already running on this call")
        return existing
    try:
        playbook = load_for_session(session, playbook_or_name)
        runner = PlaybookRunner(session, playbook, clock=clock, llm_client_factory=llm_client_factory, http=http,
                                fillers=_fillers_for(session))
    except PlaybookError as e:
        log.warn("call {id}: cannot run playbook: {e}", id=session.id, e=str(e))
        session.error("playbook", str(e))
        session.end("failed", initiator="system")
        return None
    if extras:
        session.extras.update(extras)
    for key, reason in front_matter_keys.refusals(playbook.config):
        # no silent keys: the playbook's author learns which settings did nothing
        session.error("playbook", f"front matter key '{key}' is not supported: {reason}; ignored", code=501)
    if session.state is not CallState.ANSWERED:
        option = _call_option_for(playbook)
        session.option = session.option.merged_over(option) if session.option is not None else option
    return runner.attach()


_OPTION_CACHE: dict = {}


def _call_option_for(playbook: Playbook) -> cmd.CallOption:
    """``playbook_call_option`` of a playbook that many calls share (``_load_cached``), worked out
    again after ``installed.RECHECK`` seconds (the speech defaults follow what is installed) or when
    ``ACTIVECALL_MODELS_DIR`` changes: building it per call was ~3 % of a call's CPU.  The option is
    a frozen dataclass; every session merges it into its own."""
    key = (id(playbook), speech_defaults.models_dir_from_env())
    now = time.monotonic()
    known = _OPTION_CACHE.get(key)
    if known is not None and known[0] is playbook and now - known[1] < installed.RECHECK:
        return known[2]
    option = playbook_call_option(playbook)
    if len(_OPTION_CACHE) > 256:
        _OPTION_CACHE.clear()
    _OPTION_CACHE[key] = (playbook, now, option)  # the playbook itself is kept, so its id is not reused
    return option


def _fillers_for(session) -> tuple[str, ...]:
    """``fillers.txt`` next to the playbook directory (the original's ``config/fillers.txt``), if present."""
    if session.config is None:
        return tags.DEFAULT_FILLERS
    path = os.path.join(os.path.dirname(os.path.abspath(session.config.playbook_dir)), "fillers.txt")
    return _fillers_at(path)


@installed.remembered
def _fillers_at(path: str) -> tuple[str, ...]:
    """``tags.load_fillers``, read again after a few seconds (an edited file is picked up) rather than per call."""
    return tags.load_fillers(path)


def check_configured_playbook(playbook_dir: str, name: str) -> list[str]:
    """Start-up check of one configured playbook: resolve it, read it, parse it.

    Returns the parser's warnings; raises ``ValueError`` with a one-line reason that names
    the file (``/etc/x.md: no such file``).  Injected into ``config.load_config`` by tap.py.
    """
    try:
        if name.lstrip().startswith("---"):
            return list(parse_playbook(name.lstrip(), "<inline playbook>").warnings)
        try:
            path = resolve_configured_playbook(playbook_dir, name)
        except PlaybookNameError as e:
            raise ValueError(f"{e} (a relative name is looked up under playbook_dir "
                             f"{playbook_dir!r}; give an absolute path for a file elsewhere)") from None
        if not os.path.exists(path):
            raise ValueError(f"{path}: no such file")
        if not os.path.isfile(path):
            raise ValueError(f"{path}: not a file")
        if not os.access(path, os.R_OK):
            raise ValueError(f"{path}: not readable")
        return list(load_playbook(path).warnings)
    except PlaybookError as e:
        raise ValueError(str(e)) from None
