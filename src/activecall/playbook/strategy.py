"""How the bot takes its turns: what ``PlaybookRunner`` asks of its turn strategy.

The runner keeps the dialogue around the turns (scenes, DTMF actions and collectors, follow-ups, transfers,
hangup headers, the posthook); a strategy is the part that listens to the caller's words and produces the
bot's.  Two implementations, picked from the playbook's front matter (``runner.strategy_for``):

- ``llm_strategy.LlmTurns``: ASR final -> LLM stream -> reply tags -> TTS (the default);
- ``realtime_strategy.RealtimeTurns``: a speech-to-speech model (``realtime:``) does all of that.

A strategy gets the runner when it is built and talks to the call only through the runner's methods
(``send``, ``dispatch``, ``render`` ...).
"""

from __future__ import annotations

from zope.interface import Attribute, Interface


class ITurnStrategy(Interface):
    """The bot's side of the dialogue, composed by a ``PlaybookRunner``."""

    name = Attribute("``llm`` or ``realtime``")
    reply = Attribute("The bot's reply in progress (follow-ups and end-of-utterance wait for it), or None.")

    def attach():
        """The runner listens to the call now (before it is answered)."""

    def system_prompt():
        """The system message for the current scene (the first entry of the history)."""

    def begin():
        """The runner has started (the call is answered): the bot's first words."""

    def start_turn(intro_play=None):
        """A new bot turn, after playing ``intro_play`` (a URL) when given; what was queued is superseded."""

    def caller_said(event):
        """The caller's words: an ``asrFinal`` event."""

    def caller_speaking(event):
        """``asrDelta`` or ``speaking``: the caller talks, perhaps over the bot (barge-in)."""

    def observe(event):
        """Every event of the running call, before the runner acts on it."""

    def cancel(keep_partial):
        """Stop the reply in progress (barge-in, a DTMF scene switch); ``keep_partial``: what the bot said
        of it stays in the history."""

    def scene_changed():
        """The scene has switched (the history's system prompt was rebuilt)."""

    def stop():
        """The call is over: cancel what is in flight."""
