"""``llm: {provider: echo}``: the built-in no-LLM mode, a diagnostics line like a PBX echo test.

It has the ``LLMClient`` interface (``stream`` / ``complete`` / replies as ``LLMReply``) so the runner
drives it exactly like a real model: each transcript is answered by saying it back and offering the
keypad menu, "goodbye" ends the call with ``<hangup/>``, keypad results and silence get a short line.
A fresh install thus proves VAD -> ASR -> TTS end to end with no API key and no network.

Replies follow the language of what was heard (CJK text gets a Chinese reply), English otherwise, so
the offline English voice (flite) can say them.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Optional, Sequence

from twisted.internet import defer

from activecall.playbook.llm import LLMReply

_GOODBYE = re.compile(r"\b(good ?bye|bye|hang up)\b|再见|拜拜|挂断", re.IGNORECASE)
_CJK = re.compile(r"[\u3400-\u9fff]")
_COLLECTED = re.compile(r"\[DTMF collection completed for '[^']*': ([^\]]*)\]")

LINES = {
    "en": {
        "heard": "You said: {text}. Press 1 to hear the menu again, or 0 to hang up.",
        "goodbye": "Goodbye! <hangup/>",
        "listening": "I am listening. Say something and I will repeat it.",
        "still_there": "Are you still there? Say something and I will repeat it.",
        "collected": "You entered {digits}.",
        "summary": "The caller said: {texts}.",
        "nothing": "The caller said nothing.",
    },
    "zh": {
        "heard": "你说的是：{text}。按1重听菜单，按0挂断。",
        "goodbye": "再见！<hangup/>",
        "listening": "我在听，请说话，我会复述。",
        "still_there": "你还在吗？请说话，我会复述。",
        "collected": "你输入的是{digits}。",
        "summary": "来电者说：{texts}。",
        "nothing": "来电者什么也没说。",
    },
}


def echo_reply(messages: Sequence[Mapping[str, Any]]) -> str:
    """The reply to a conversation, from its last message."""
    last = messages[-1] if messages else {"role": "system", "content": ""}
    text = str(last.get("content") or "").strip()
    lang = "zh" if _CJK.search(text) else "en"
    lines = LINES[lang]
    if last.get("role") == "user":
        if _GOODBYE.search(text):
            return lines["goodbye"]
        return lines["heard"].format(text=text.rstrip(".!?。！？ "))
    if last.get("role") == "system" and len(messages) > 1:
        m = _COLLECTED.search(text)
        if m:
            return lines["collected"].format(digits=" ".join(m.group(1)))
    if last.get("role") == "assistant":
        return lines["still_there"]
    return lines["listening"]


def echo_summary(messages: Sequence[Mapping[str, Any]]) -> str:
    said = [str(m.get("content") or "").strip() for m in messages if m.get("role") == "user"]
    said = [s for s in said if s]
    lang = "zh" if any(_CJK.search(s) for s in said) else "en"
    if not said:
        return LINES[lang]["nothing"]
    return LINES[lang]["summary"].format(texts="; ".join(s.rstrip(".!?。！？ ") for s in said))


class EchoLLM:
    """The echo "model": answers at once, word by word, offline."""

    def stream(
        self, messages: Sequence[Mapping[str, Any]], on_delta: Callable[[str], Any], tools: Optional[Sequence] = None
    ) -> defer.Deferred:
        reply = echo_reply(messages)
        for piece in re.findall(r"\S+\s*|\s+", reply):
            on_delta(piece)
        return defer.succeed(LLMReply(reply, finish_reason="stop"))

    def complete(self, messages: Sequence[Mapping[str, Any]], tools: Optional[Sequence] = None) -> defer.Deferred:
        """Summaries (the runner asks for them with a final user prompt) and tool re-asks."""
        last = messages[-1] if messages else {}
        if last.get("role") == "user":
            return defer.succeed(LLMReply(echo_summary(messages[:-1]), finish_reason="stop"))
        return defer.succeed(LLMReply(echo_reply(messages), finish_reason="stop"))
