"""The system prompt a playbook's scene becomes (docs/playbooks.md, "Scenes"), and the runtime's fixed prompts.

The original loaded feature snippets and tool instructions from ``features/*.md`` files next to the
binary; here they are built in (English; the model follows them whatever language it answers in), so a
playbook behaves the same on every install.  ``llm.toolInstructions`` still replaces the tool text.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

FEATURE_SNIPPETS = {
    "intent_clarification": "When the caller's request is ambiguous, ask one short clarifying question "
                            "before acting.",
    "emotion_resonance": "Notice the caller's mood and acknowledge it briefly and sincerely.",
    "voice_emotion": "Speak warmly and naturally, as a person on the phone would.",
    "http_tool": "You can call HTTP APIs with "
                 "<http url=\"https://...\" method=\"GET|POST\" body='...' set_var=\"name\"/>; "
                 "the result arrives as a system message.",
    "context_repair": "Speech recognition may split one utterance into pieces; treat consecutive "
                      "user fragments as one request.",
    "rolling_summary": "Earlier parts of a long conversation may be replaced by a summary; rely on it.",
}

DEFAULT_TOOL_INSTRUCTIONS = """### Tools
You are speaking on a phone call: answer in short, plain sentences without markdown, lists or emoji.
You can act with these tags, written inside your reply (they are never spoken):
- <hangup/> ends the call after your reply has been spoken (say goodbye first).
- <refer to="sip:user@host"/> transfers the caller.
- <play file="path-or-url"/> plays an audio file.
- <goto scene="name"/> switches to another scene of the conversation.
- <set_var key="name" value="value"/> remembers a value for later.
- <http url="https://..." method="GET|POST" body='...'/> calls an HTTP API; the result arrives as a system message.
Alternatively reply with JSON only: {"text": "what to say", "tools": [{"name": "hangup"} | {"name": "refer", "callee": "sip:..."} | {"name": "http", "url": "...", "method": "GET", "body": {...}}]}."""

COLLECTOR_INTRO = """### Keypad input
To collect digits from the caller's keypad, output <collect type="COLLECTOR" var="VARIABLE" prompt="what to say"/> and stop.
Available collectors:"""

COLLECTOR_FLOW = """The result arrives as a system message ([DTMF collection completed for 'VARIABLE': digits], or a
failure or timeout note); then continue the conversation with it."""

SUMMARY_PROMPTS = {
    "short": "Summarize the conversation in one or two sentences.",
    "detailed": "Summarize the conversation in detail, including key points, decisions, and action items.",
    "intent": "Identify and summarize the user's main intent and needs.",
    "json": "Summarize the conversation in JSON format with fields: intent, key_points, sentiment.",
}

ROLLING_SUMMARY_PROMPT = "Summarize the above conversation so far, focusing on key details and user intent."
SUMMARY_MARKER = "[Previous Context Summary]: "


def collector_line(name: str, collector) -> str:
    """`` - `name`: description (4 digits | 3-6 digits, press # to finish)``."""
    if collector.digits is not None:
        size = f"{collector.digits} digits"
    elif collector.min_digits is not None or collector.max_digits is not None:
        size = f"{collector.min_digits or 1}-{collector.max_digits or 'any'} digits"
    else:
        size = "any number of digits"
    finish = f", press {collector.finish_key} to finish" if collector.finish_key else ""
    return f"- `{name}`: {collector.description or name} ({size}{finish})"


def collector_section(collectors: Mapping[str, object]) -> str:
    if not collectors:
        return ""
    lines = [COLLECTOR_INTRO] + [collector_line(n, collectors[n]) for n in sorted(collectors)] + [COLLECTOR_FLOW]
    return "\n".join(lines)


def system_prompt(
    scene_prompt: str,
    features: Sequence[str] = (),
    tool_instructions: Optional[str] = None,
    collectors: Mapping[str, object] = {},
    summary: Optional[str] = None,
) -> str:
    """``{scene}`` + feature snippets + tool instructions + collectors (+ the rolling summary)."""
    out = scene_prompt.strip()
    snippets = [FEATURE_SNIPPETS[f] for f in features if f in FEATURE_SNIPPETS]
    if snippets:
        out += "\n\n### Enhanced Capabilities:" + "".join(f"\n- {s}" for s in snippets) + "\n"
    out += "\n\n" + (tool_instructions if tool_instructions is not None else DEFAULT_TOOL_INSTRUCTIONS)
    section = collector_section(collectors)
    if section:
        out += "\n" + section
    if summary:
        out += "\n\n" + SUMMARY_MARKER + summary
    return out


def summary_prompt(kind: str) -> str:
    """One of the fixed posthook prompts, or ``kind`` itself as a custom prompt."""
    return SUMMARY_PROMPTS.get(kind.strip().lower(), kind)
