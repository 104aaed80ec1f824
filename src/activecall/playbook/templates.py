"""Runtime ``{{ var }}`` templates over a call's variables (Jinja2, sandboxed).

A template mistake in a playbook must never end a call: ``render`` logs and falls back to the text as
written.  Undefined names render as ``""`` (also through chains like ``{{ a.b }}``).

Context: every call variable whose name does not start with ``_``; the built-ins ``session_id``,
``call_type``, ``start_time``, ``caller`` and ``callee`` (never overwriting a variable of the same name);
``sip``, the SIP headers as a case-insensitive dict (``{{ sip["X-Foo"] }}``); and ``vars``, every variable
by name (``{{ vars["order-id"] }}``).  The safe direct form: an expression that is only a hyphenated name,
``{{ X-Foo }}``, is read as that variable instead of a subtraction (which would fail).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, MutableMapping, Optional

from jinja2 import ChainableUndefined
from jinja2.sandbox import SandboxedEnvironment
from twisted.logger import Logger

log = Logger()

#: Variable holding BYE headers set in bulk with ``<set_var key="_hangup_headers" value='{...}'/>``.
HANGUP_HEADERS_VAR = "_hangup_headers"
#: Variable listing which variables are SIP headers (set when the INVITE's headers are captured).
SIP_HEADER_KEYS_VAR = "_sip_header_keys"

_HYPHENATED = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*(?:-[A-Za-z0-9_]+)+)\s*\}\}")

_env = SandboxedEnvironment(undefined=ChainableUndefined, autoescape=False, keep_trailing_newline=True)


@dataclass(frozen=True)
class CallInfo:
    """The built-in variables of one call."""

    session_id: str = ""
    call_type: str = ""  # sip | websocket | webrtc | b2bua
    start_time: str = ""  # RFC 3339
    caller: Optional[str] = None  # inbound SIP only
    callee: Optional[str] = None


class HeaderDict(dict):
    """SIP headers: ``sip["x-foo"]`` finds ``X-Foo`` (header names are case-insensitive)."""

    def __missing__(self, key):
        if isinstance(key, str):
            lower = key.lower()
            for name, value in self.items():
                if name.lower() == lower:
                    return value
        raise KeyError(key)


def is_header_name(name: str) -> bool:
    return name[:2].lower() == "x-"


def template_context(
    variables: Mapping[str, Any],
    call: Optional[CallInfo] = None,
    sip_header_keys: Optional[Iterable[str]] = None,
) -> dict[str, Any]:
    """The rendering context: public variables, built-ins, ``sip`` and ``vars``.

    SIP headers are the variables named in ``sip_header_keys`` (default: ``variables["_sip_header_keys"]``)
    plus every ``X-`` variable, so a header set with ``<set_var key="X-…">`` is visible as ``sip["X-…"]``.
    """
    public = {k: v for k, v in variables.items() if not k.startswith("_")}
    context: dict[str, Any] = dict(public)
    if call is not None:
        for name in ("session_id", "call_type", "start_time", "caller", "callee"):
            value = getattr(call, name)
            if value is not None:
                context.setdefault(name, value)
    if sip_header_keys is None:
        sip_header_keys = variables.get(SIP_HEADER_KEYS_VAR) or ()
    wanted = {k.lower() for k in sip_header_keys}
    context["sip"] = HeaderDict({k: v for k, v in public.items() if k.lower() in wanted or is_header_name(k)})
    context["vars"] = dict(public)
    return context


def rewrite_hyphenated(template: str) -> str:
    """``{{ X-Foo }}`` -> ``{{ vars["X-Foo"] }}``: the documented safe direct form for header names."""
    return _HYPHENATED.sub(lambda m: '{{ vars["%s"] }}' % m.group(1), template)


def render_string(template: str, context: Mapping[str, Any]) -> str:
    """Render or raise ``jinja2.TemplateError`` / ``SecurityError``: for checks that want the reason."""
    return _env.from_string(rewrite_hyphenated(template)).render(context)


def render(template: str, context: Mapping[str, Any], fallback: Optional[str] = None, what: str = "template") -> str:
    """Render ``template``; on any error log it and return ``fallback`` (default: the template as written)."""
    if "{{" not in template and "{%" not in template:
        return template
    try:
        return render_string(template, context)
    except Exception as e:  # a playbook mistake must never take the call down
        log.warn("cannot render {what}: {error}", what=what, error=f"{type(e).__name__}: {e}")
        return template if fallback is None else fallback


def render_hangup_headers(templates: Mapping[str, str], context: Mapping[str, Any]) -> dict[str, str]:
    """``sip.hangup_headers`` rendered for the BYE; a header that fails to render keeps its raw template."""
    return {name: render(value, context, what=f"hangup header {name}") for name, value in templates.items()}


def bye_headers(
    templates: Mapping[str, str], variables: Mapping[str, Any], call: Optional[CallInfo] = None
) -> dict[str, str]:
    """The BYE's headers: ``_hangup_headers`` set in bulk, then the rendered templates on top.

    Unlike the original, a playbook without ``hangup_headers`` keeps the bulk value instead of wiping it.
    """
    bulk = variables.get(HANGUP_HEADERS_VAR)
    if isinstance(bulk, str):
        try:
            bulk = json.loads(bulk)
        except ValueError:
            bulk = None
    out = {str(k): str(v) for k, v in bulk.items()} if isinstance(bulk, dict) else {}
    out.update(render_hangup_headers(templates, template_context(variables, call)))
    return out


def set_var(variables: MutableMapping[str, Any], key: str, value: str) -> None:
    """Apply ``<set_var key value/>``: values are stored as strings; ``_hangup_headers`` must be a JSON map."""
    if key == HANGUP_HEADERS_VAR:
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            log.warn("set_var {key}: value is not a JSON object, ignored", key=key)
            return
    variables[key] = str(value)


def extract_header_vars(
    headers: Mapping[str, str], names: Optional[Iterable[str]], patterns: Mapping[str, str] = {}
) -> dict[str, Any]:
    """The INVITE headers a playbook asked for (``sip.extract_headers``, case-insensitive) as variables.

    A header with a ``pattern`` is kept only when its value matches (the first group, if any, is kept).
    ``_sip_header_keys`` lists the names kept.  Built-ins are not touched (the original dropped them here).
    """
    if names is None:
        return {}
    wanted = {n.lower(): n for n in names}
    by_lower = {p.lower(): r for p, r in patterns.items()}
    out: dict[str, Any] = {}
    for name, value in headers.items():
        if name.lower() not in wanted:
            continue
        regex = by_lower.get(name.lower())
        if regex is not None:
            m = re.search(regex, value)
            if m is None:
                log.info("header {name} does not match its pattern, not extracted", name=name)
                continue
            value = m.group(1) if m.groups() else value
        out[name] = value
    out[SIP_HEADER_KEYS_VAR] = sorted(k for k in out)
    return out
