"""DTMF collectors: ``<collect type var prompt/>`` gathers the caller's digits into a variable
(docs/playbooks.md, "DTMF collectors").

A collection runs between the reply that asked for it and the next turn: digits go to it (not to the
scene's DTMF actions), speech is ignored unless the collector is ``interruptible``, and its timers (overall
and between digits) run on the runner's clock.  The outcome -- collected, rejected and retried, failed,
timed out -- becomes a system note and the bot takes the next turn.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Optional

from twisted.logger import Logger

from activecall.backlink import back_link
from activecall.playbook import tags
from activecall.protocol import commands as cmd

log = Logger(namespace="activecall.playbook")


@dataclass
class Collection:
    """A DTMF collector in progress (``<collect type var prompt/>``)."""

    name: str
    var: str
    config: Any  # parser.CollectorConfig
    digits: str = ""
    retries: int = 0
    overall: Any = None  # IDelayedCall
    inter_digit: Any = None


class DigitCollector:
    """The collections of one ``PlaybookRunner`` (at most one at a time: ``current``)."""

    #: the playbook runner; weak once the call has ended (activecall/backlink.py)
    runner = back_link()

    def __init__(self, runner):
        self.runner = runner
        self.current: Optional[Collection] = None

    def start(self, tag: tags.Collect, say: Optional[Callable[[str], None]] = None,
              reply_spoke: bool = False) -> None:
        """Begin collecting for ``tag``.  ``say``: speak the prompt as part of the reply that asked
        (else it is a TTS of its own); ``reply_spoke``: that reply has said something, so the timeout
        starts once it has been played."""
        runner = self.runner
        collectors = runner.config.dtmf_collectors
        config = collectors.get(tag.type)
        if config is None:
            names = ", ".join(sorted(collectors)) or "none"
            runner.system_note(f"[Unknown DTMF collector type '{tag.type}'. Available types: {names}]")
            return
        self.end()
        self.current = Collection(tag.type, tag.var, config)
        log.info("call {id}: collecting digits into {var} ({name})", id=runner.session.id, var=tag.var,
                 name=tag.type)
        if tag.prompt and say is not None:
            say(tag.prompt)
        elif tag.prompt:
            runner.send(cmd.Tts(text=tag.prompt, playId=runner.next_play_id(), endOfStream=True))
        if not runner.is_speaking and not (tag.prompt or reply_spoke):
            self.arm_timeout()

    def arm_timeout(self) -> None:
        c = self.current
        if c is None:
            return
        _cancel(c.overall)
        c.overall = self.runner.clock.callLater(c.config.timeout, self._timed_out, c)

    def digit(self, digit: str) -> None:
        c = self.current
        config = c.config
        _cancel(c.overall)
        _cancel(c.inter_digit)
        if config.finish_key and digit == config.finish_key:
            self._finish(c)
            return
        c.digits += digit
        if not config.finish_key and config.maximum is not None and len(c.digits) >= config.maximum:
            self._finish(c)
            return
        clock = self.runner.clock
        c.inter_digit = clock.callLater(config.inter_digit_timeout, self._inter_digit_timed_out, c)
        c.overall = clock.callLater(config.timeout, self._timed_out, c)

    def _inter_digit_timed_out(self, c: Collection) -> None:
        if c is self.current and c.digits:
            self._finish(c)

    def _timed_out(self, c: Collection) -> None:
        if c is not self.current:
            return
        if c.digits:
            self._finish(c)
            return
        self.end()
        self.runner.system_note(f"[DTMF collection timed out for '{c.var}'. No digits were entered. "
                                "Please guide the user.]")
        self.runner.start_turn()

    def _finish(self, c: Collection) -> None:
        runner = self.runner
        config = c.config
        problem = None
        if len(c.digits) < config.minimum:
            problem = f"Expected at least {config.minimum} digits, got {len(c.digits)}"
        elif config.maximum and len(c.digits) > config.maximum:
            problem = f"Expected at most {config.maximum} digits, got {len(c.digits)}"
        elif config.validation is not None and re.search(config.validation.pattern, c.digits) is None:
            problem = config.validation.error_message
        if problem is None:
            self.end()
            runner.variables[c.var] = c.digits
            runner.refresh_hangup_headers()
            runner.system_note(f"[DTMF collection completed for '{c.var}': {c.digits}]")
            runner.start_turn()
            return
        if c.retries < config.retry_times:
            c.retries += 1
            c.digits = ""
            message = config.validation.error_message if config.validation is not None else problem
            log.info("call {id}: digits for {var} rejected ({why}), retry {n}", id=runner.session.id, var=c.var,
                     why=problem, n=c.retries)
            runner.send(cmd.Tts(text=message, playId=runner.next_play_id(), endOfStream=True))
            return
        self.end()
        runner.system_note(f"[DTMF collection failed for '{c.var}' after {c.retries} retries: {problem}. "
                           "Please guide the user to try again or offer another way.]")
        runner.start_turn()

    def end(self) -> None:
        """Stop the collection in progress, if any (its timers are cancelled)."""
        c, self.current = self.current, None
        if c is not None:
            _cancel(c.overall)
            _cancel(c.inter_digit)


def _cancel(call) -> None:
    if call is not None and call.active():
        call.cancel()
