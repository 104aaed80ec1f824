"""What a reply can ask the runner to do beyond speaking: ``<http>`` tags and the JSON-mode tool commands
(docs/playbooks.md, "Tags" and "JSON mode").

- ``HttpTools``: the runner's HTTP (``<http>`` in the background, the ``http`` tool, the posthook's
  delivery), each request with a timeout on the runner's clock; results join the conversation as system
  notes, and the next LLM turn waits for ``<http>`` requests still in flight;
- ``apply_json_tools``: one round of a JSON command's ``tools`` (hangup, refer, http, rag, accept, reject).
"""

from __future__ import annotations

import json
from typing import Optional

from twisted.internet import defer
from twisted.logger import Logger

from activecall.backlink import back_link
from activecall.call.session import CallState
from activecall.playbook import tags
from activecall.playbook.templates import set_var
from activecall.protocol import commands as cmd

log = Logger(namespace="activecall.playbook")

#: how much of an HTTP response body goes into the conversation
MAX_HTTP_BODY = 4000


def _default_http_client():
    from twisted.internet import reactor

    from activecall.httpclient import default_http_client

    return default_http_client(reactor)


def failure_text(error) -> str:
    """A request's failure in a few words (a timeout says so)."""
    value = getattr(error, "value", error)
    if isinstance(value, (defer.TimeoutError, defer.CancelledError)):
        return "timed out"
    return str(value) or type(value).__name__


class HttpTools:
    """The HTTP of one ``PlaybookRunner``; ``http`` is a treq-like client (default: the shared one)."""

    #: the playbook runner; weak once the call has ended (activecall/backlink.py)
    runner = back_link()

    def __init__(self, runner, http=None):
        self.runner = runner
        self._http = http
        self.pending: list[defer.Deferred] = []  # <http> requests in flight

    @property
    def http(self):
        if self._http is None:
            self._http = _default_http_client()
        return self._http

    def call(self, method: str, url: str, body: Optional[bytes], headers: dict, timeout: float) -> defer.Deferred:
        """(status, body text); fails on a connection error or after ``timeout`` seconds."""

        @defer.inlineCallbacks
        def call():
            response = yield self.http.request(method, url, data=body,
                                               headers={k: [v] for k, v in headers.items()})
            content = yield response.content()
            return response.code, content.decode("utf-8", "replace")

        d = call()
        d.addTimeout(timeout, self.runner.clock)
        return d

    def settled(self) -> Optional[defer.Deferred]:
        """A Deferred that fires once every ``<http>`` in flight has answered, or None if none is."""
        if not self.pending:
            return None
        return defer.DeferredList(list(self.pending), consumeErrors=True)

    def tag(self, tag: tags.Http) -> None:
        """``<http>``: runs in the background with its timeout; the result joins the conversation."""
        runner = self.runner
        url = runner.render(tag.url)
        body = runner.render(tag.body) if tag.body is not None else None
        d = self.call(tag.method, url, body.encode("utf-8") if body is not None else None, {}, tag.timeout)

        def done(result):
            status, text = result
            if tag.set_var:
                set_var(runner.variables, tag.set_var, text)
                runner.refresh_hangup_headers()
            runner.system_note(f"HTTP {tag.method} {url} returned ({status}): {text[:MAX_HTTP_BODY]}")

        def failed(failure):
            runner.system_note(f"HTTP {tag.method} {url} failed: {failure_text(failure)}")

        d.addCallbacks(done, failed)
        self.pending.append(d)
        d.addBoth(lambda _: self.pending.remove(d) if d in self.pending else None)

    @defer.inlineCallbacks
    def tool(self, tool: tags.HttpTool):
        """The JSON ``http`` tool: its result as a note for the conversation."""
        body = None
        headers = dict(tool.headers)
        if tool.body is not None:
            body = (tool.body if isinstance(tool.body, str) else json.dumps(tool.body)).encode("utf-8")
            headers.setdefault("Content-Type", "application/json")
        try:
            status, text = yield self.call(tool.method, tool.url, body, headers, tags.DEFAULT_HTTP_TIMEOUT)
        except Exception as e:
            return f"HTTP tool failed: {failure_text(e)}"
        return f"HTTP tool response ({status}): {text[:MAX_HTTP_BODY]}"


@defer.inlineCallbacks
def apply_json_tools(runner, reply, tools):
    """Act on one round of a JSON command's tools.  Fires with ``(hangup, reask)``: the last hangup tool
    (or None), and whether a result (http, rag) went into the history so the model must be asked again."""
    hangup: Optional[tags.HangupTool] = None
    reask = False
    for tool in tools:
        if isinstance(tool, tags.HangupTool):
            hangup = tool
        elif isinstance(tool, tags.ReferTool):
            runner.refer(tool.callee, reply, caller=tool.caller, options=tool.options)
        elif isinstance(tool, tags.HttpTool):
            note = yield runner.tools.tool(tool)
            runner.history.append({"role": "system", "content": note})
            reask = True
        elif isinstance(tool, tags.RagTool):
            runner.history.append({"role": "system", "content": f"RAG result for {tool.query}: "
                                   "no knowledge base is configured for this playbook."})
            reask = True
        elif isinstance(tool, tags.AcceptTool):
            _accept(runner, tool)
        elif isinstance(tool, tags.RejectTool):
            _reject(runner, tool)
    return hangup, reask


def _accept(runner, tool: tags.AcceptTool) -> None:
    if runner.session.state is CallState.ANSWERED:
        log.info("call {id}: accept tool ignored, the call is already answered", id=runner.session.id)
        return
    option = cmd.CallOption.from_dict(dict(tool.options))
    runner.dispatch(cmd.Accept(option=option))


def _reject(runner, tool: tags.RejectTool) -> None:
    if runner.session.state is CallState.ANSWERED:
        runner.end_call("rejected", status_code=tool.code or 603)
        return
    runner.dispatch(cmd.Reject(reason=tool.reason, code=tool.code))
