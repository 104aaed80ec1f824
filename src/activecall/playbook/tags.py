"""What the LLM says, turned into things to do: sentences for TTS and action tags, as the text streams in.

``ReplyParser.feed(delta)`` returns the events that became certain with that delta; ``finish()`` returns
the rest.  Sentences end at ``. ! ?`` followed by white space, at ``。！？`` and at a newline; a sentence
shorter than ``min_sentence_chars`` waits to be joined with the next one; with ``first_clause_chars`` the
reply's first sentence also ends at its first clause boundary, so speech starts sooner.  Tags may be split across deltas
and never reach the TTS: text before a tag is flushed first, then the tag's event.  Any ``<name …>`` markup
is taken out of the spoken text; a malformed or unknown tag is logged and dropped, never spoken.

A reply whose first non-blank character is ``{`` or a backquote is a JSON command (docs/playbooks.md §5): it is
buffered whole and parsed by ``parse_json_command`` at the end; if it is not valid, it is spoken as text.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Union
from xml.sax.saxutils import unescape

from twisted.logger import Logger

log = Logger()

_ENTITIES = {"&quot;": '"', "&apos;": "'"}
_ATTRIBUTE = re.compile(r"([A-Za-z_][\w-]*)\s*=\s*(?:\"([^\"]*)\"|'([^']*)')")
_NAME = re.compile(r"/?\s*([A-Za-z_][\w-]*)")
_ASCII_ENDS = ".!?"
_HARD_ENDS = "。！？\n"
_ASCII_CLAUSE_ENDS = ",;:"
_CLAUSE_ENDS = ",;:，、；："
HTTP_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
DEFAULT_HTTP_TIMEOUT = 10.0


# -- events ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sentence:
    text: str


@dataclass(frozen=True)
class Hangup:
    pass


@dataclass(frozen=True)
class Refer:
    to: str


@dataclass(frozen=True)
class WarmTransfer:
    """``<warm_transfer to="sip:…" summary="…" moh="hold.wav"/>``: hold, consult, then connect."""

    to: str
    summary: Optional[str] = None
    moh: Optional[str] = None


@dataclass(frozen=True)
class Play:
    file: str


@dataclass(frozen=True)
class Goto:
    scene: str


@dataclass(frozen=True)
class SetVar:
    key: str
    value: str


@dataclass(frozen=True)
class Http:
    """``<http url method body set_var timeout/>``: ``set_var`` stores the response body in a variable."""

    url: str
    method: str = "GET"
    body: Optional[str] = None
    set_var: Optional[str] = None
    timeout: float = DEFAULT_HTTP_TIMEOUT


@dataclass(frozen=True)
class Collect:
    type: str
    var: str
    prompt: Optional[str] = None


TagEvent = Union[Hangup, Refer, Play, Goto, SetVar, Http, Collect, WarmTransfer]


class MalformedTag(ValueError):
    pass


def _attributes(inner: str) -> dict[str, str]:
    """Attributes in any order, either quote; anything else in the tag makes it malformed."""
    attrs = {}
    for m in _ATTRIBUTE.finditer(inner):
        value = m.group(2) if m.group(2) is not None else m.group(3)
        attrs[m.group(1).lower()] = unescape(value, _ENTITIES)
    leftover = _ATTRIBUTE.sub("", inner).replace("/", "").strip()
    if leftover:
        raise MalformedTag(f"unexpected {leftover!r}")
    return attrs


def _required(attrs: Mapping[str, str], name: str) -> str:
    value = attrs.get(name, "").strip()
    if not value:
        raise MalformedTag(f"needs a non-empty '{name}'")
    return value


def _http(attrs: Mapping[str, str]) -> Http:
    method = attrs.get("method", "GET").strip().upper() or "GET"
    if method not in HTTP_METHODS:
        log.warn("<http> method {method} is not supported, using GET", method=method)
        method = "GET"
    timeout = DEFAULT_HTTP_TIMEOUT
    if "timeout" in attrs:
        try:
            timeout = float(attrs["timeout"])
        except ValueError:
            raise MalformedTag(f"timeout {attrs['timeout']!r} is not a number of seconds") from None
    return Http(_required(attrs, "url"), method, attrs.get("body"), attrs.get("set_var") or None, timeout)


_BUILDERS = {
    "hangup": lambda a: Hangup(),
    "refer": lambda a: Refer(_required(a, "to")),
    "play": lambda a: Play(_required(a, "file")),
    "goto": lambda a: Goto(_required(a, "scene")),
    "set_var": lambda a: SetVar(_required(a, "key"), a["value"] if "value" in a else _required(a, "value")),
    "http": _http,
    "collect": lambda a: Collect(_required(a, "type"), _required(a, "var"), a.get("prompt") or None),
    "warm_transfer": lambda a: WarmTransfer(_required(a, "to"), a.get("summary") or None, a.get("moh") or None),
}
TAG_NAMES = tuple(_BUILDERS)


def parse_tag(text: str) -> Optional[TagEvent]:
    """One complete ``<…>`` tag -> its event; None for a closing tag.  Raises MalformedTag."""
    m = _NAME.match(text, 1)
    if m is None or not text.endswith(">"):
        raise MalformedTag("not a tag")
    if text[1:].lstrip().startswith("/"):
        return None
    name = m.group(1).lower()
    builder = _BUILDERS.get(name)
    if builder is None:
        raise MalformedTag(f"unknown tag <{name}>")
    return builder(_attributes(text[m.end() : -1]))


def _tag_end(buf: str, start: int) -> int:
    """The index of the ``>`` closing the tag opened at ``start`` (quotes respected), or -1."""
    quote = None
    for i in range(start + 1, len(buf)):
        ch = buf[i]
        if quote:
            if ch == quote:
                quote = None
        elif ch in "\"'" and buf[start:i].rstrip().endswith("="):
            quote = ch
        elif ch == ">":
            return i
    return -1


# -- the stream parser ----------------------------------------------------------------------------------


@dataclass
class ReplyParser:
    """Incremental parser for one LLM reply."""

    min_sentence_chars: int = 3
    #: > 0: the reply's first sentence is cut at its first clause (``, ; :`` then a space, or ``，、；：``)
    #: once that clause has this many characters, so the TTS starts on a shorter text (0: off)
    first_clause_chars: int = 0
    max_tag_chars: int = 4096
    raw: str = ""
    mode: Optional[str] = None  # None until the first non-blank character, then "xml" or "json"
    _buf: str = ""
    _pending: str = ""
    _finished: bool = field(default=False, repr=False)
    _spoke: bool = field(default=False, repr=False)  # a Sentence was emitted

    def feed(self, delta: str) -> list:
        """Events made certain by ``delta``."""
        if self._finished:
            raise RuntimeError("feed() after finish()")
        self.raw += delta
        if self.mode is None:
            head = self.raw.lstrip()
            if not head:
                return []
            self.mode = "json" if head[0] in "{`" else "xml"
            if self.mode == "xml":
                delta = self.raw
        if self.mode == "json":
            return []
        self._buf += delta
        return self._scan(final=False)

    def finish(self) -> list:
        """The remaining events at end of stream: the last sentence, or the JSON command."""
        self._finished = True
        if self.mode == "json":
            command = parse_json_command(self.raw)
            if command is not None:
                return [command]
            log.info("LLM reply looked like JSON but is not a command; speaking it")
            self._buf = self.raw
        events = self._scan(final=True)
        return events + self._sentence("", force=True)

    def _sentence(self, text: str, force: bool) -> list:
        combined = self._pending + text
        if not force and len(combined.strip()) < self.min_sentence_chars:
            self._pending = combined
            return []
        self._pending = ""
        if not combined.strip():
            return []
        self._spoke = True
        return [Sentence(combined.strip())]

    def _scan(self, final: bool) -> list:
        events: list = []
        buf, pos = self._buf, 0
        while pos < len(buf):
            ch = buf[pos]
            if ch == "<":
                end = self._tag_at(buf, pos, final)
                if end == -1:  # wait for more of the tag
                    break
                if end is None:  # not markup: plain text
                    pos += 1
                    continue
                events += self._sentence(buf[:pos], force=True)
                events += self._take_tag(buf[pos : end + 1])
                buf, pos = buf[end + 1 :], 0
            elif ch in _HARD_ENDS or (ch in _ASCII_ENDS and self._ascii_end(buf, pos, final)):
                end = pos + 1
                while end < len(buf) and (buf[end].isspace() or buf[end] in _ASCII_ENDS):
                    end += 1
                events += self._sentence(buf[:end], force=False)
                buf, pos = buf[end:], 0
            elif ch in _ASCII_ENDS and pos + 1 == len(buf) and not final:
                break  # is it "3.5" or "end. Next"? wait for the next character
            elif ch in _CLAUSE_ENDS and self.first_clause_chars and not self._spoke:
                if ch in _ASCII_CLAUSE_ENDS and pos + 1 == len(buf) and not final:
                    break  # "1,000" or "yes, and"? wait for the next character
                if (ch not in _ASCII_CLAUSE_ENDS or (pos + 1 < len(buf) and buf[pos + 1].isspace())) and \
                        len((self._pending + buf[:pos]).strip()) + 1 >= self.first_clause_chars:
                    events += self._sentence(buf[: pos + 1], force=True)
                    buf, pos = buf[pos + 1:], 0
                else:
                    pos += 1
            else:
                pos += 1
        self._buf = buf
        if final and buf:
            events += self._sentence(buf, force=False)
            self._buf = ""
        return events

    @staticmethod
    def _ascii_end(buf: str, pos: int, final: bool) -> bool:
        if pos + 1 < len(buf):
            return buf[pos + 1].isspace()
        return final

    def _tag_at(self, buf: str, pos: int, final: bool):
        """End index of the markup at ``pos``; -1 to wait for more text; None when it is not markup."""
        after = buf[pos + 1 :]
        if not after:
            return None if final else -1
        m = _NAME.match(buf, pos + 1)
        if m is None:
            if not final and after.strip() in ("", "/"):
                return -1
            return None
        end = _tag_end(buf, pos)
        if end != -1:
            return end
        known = m.group(1).lower() in TAG_NAMES or (
            m.end() == len(buf) and any(n.startswith(m.group(1).lower()) for n in TAG_NAMES)
        )
        if not final and len(buf) - pos <= self.max_tag_chars:
            return -1
        if known:
            log.warn("dropping an unterminated <{name}> tag from the reply", name=m.group(1))
            return len(buf) - 1
        return None

    def _take_tag(self, text: str) -> list:
        try:
            event = parse_tag(text)
        except MalformedTag as e:
            log.warn("dropping malformed tag {tag!r}: {reason}", tag=text[:200], reason=str(e))
            return []
        return [event] if event is not None else []


# -- JSON command mode ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class HangupTool:
    reason: Optional[str] = None
    initiator: Optional[str] = None


@dataclass(frozen=True)
class ReferTool:
    callee: str
    caller: Optional[str] = None
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RagTool:
    query: str
    source: Optional[str] = None


@dataclass(frozen=True)
class HttpTool:
    url: str
    method: str = "GET"
    body: Any = None
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class AcceptTool:
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RejectTool:
    reason: str = "Rejected by agent"
    code: Optional[int] = None


Tool = Union[HangupTool, ReferTool, RagTool, HttpTool, AcceptTool, RejectTool]


@dataclass(frozen=True)
class JsonCommand:
    text: Optional[str] = None
    wait_input_timeout: Optional[int] = None
    tools: tuple = ()


_FENCE = re.compile(r"^```[A-Za-z]*\s*(.*?)\s*```$", re.DOTALL)


def _tool(spec: Any) -> Optional[Tool]:
    if not isinstance(spec, dict):
        return None
    name = spec.get("name")
    s = lambda k: None if spec.get(k) is None else str(spec[k])  # noqa: E731
    d = lambda k: spec[k] if isinstance(spec.get(k), dict) else {}  # noqa: E731
    if name == "hangup":
        return HangupTool(s("reason"), s("initiator"))
    if name == "refer" and spec.get("callee"):
        return ReferTool(str(spec["callee"]), s("caller"), d("options"))
    if name == "rag" and spec.get("query"):
        return RagTool(str(spec["query"]), s("source"))
    if name == "http" and spec.get("url"):
        method = str(spec.get("method") or "GET").upper()
        return HttpTool(str(spec["url"]), method if method in HTTP_METHODS else "GET", spec.get("body"),
                        {str(k): str(v) for k, v in d("headers").items()})
    if name == "accept":
        return AcceptTool(d("options"))
    if name == "reject":
        code = spec.get("code")
        return RejectTool(s("reason") or "Rejected by agent", code if isinstance(code, int) else None)
    return None


def parse_json_command(text: str) -> Optional[JsonCommand]:
    """``{"text"?, "waitInputTimeout"?, "tools"?: [{"name": …}]}``, optionally in a code fence; None if not one."""
    text = text.strip()
    m = _FENCE.match(text)
    if m:
        text = m.group(1)
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    tools = []
    for spec in data.get("tools") or []:
        tool = _tool(spec)
        if tool is None:
            log.warn("ignoring unusable tool call {spec!r}", spec=str(spec)[:200])
        else:
            tools.append(tool)
    reply = data.get("text")
    timeout = data.get("waitInputTimeout")
    return JsonCommand(
        None if reply is None else str(reply),
        timeout if isinstance(timeout, int) and not isinstance(timeout, bool) else None,
        tuple(tools),
    )


# -- fillers --------------------------------------------------------------------------------------------

DEFAULT_FILLERS = ("嗯", "啊", "哦", "那个", "那个...", "uh", "um", "ah")
_NOT_WORD = re.compile(r"[\s.,!?;:。，！？；：…、~\-\"']+")


def load_fillers(path: str) -> tuple[str, ...]:
    """Filler words, one a line (``#`` comments); the built-in list if the file cannot be read."""
    try:
        with open(path, encoding="utf-8") as f:
            words = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    except OSError:
        return DEFAULT_FILLERS
    return tuple(words) or DEFAULT_FILLERS


def is_filler(text: str, fillers: Iterable[str] = DEFAULT_FILLERS) -> bool:
    """True when ``text`` holds nothing but filler words (so it should not interrupt the bot)."""
    words = sorted({_NOT_WORD.sub("", w.lower()) for w in fillers} - {""}, key=len, reverse=True)
    squeezed = _NOT_WORD.sub("", text.lower())
    if not squeezed:
        return True
    if not words:
        return False
    return re.fullmatch("(?:%s)+" % "|".join(map(re.escape, words)), squeezed) is not None
