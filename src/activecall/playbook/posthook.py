"""The posthook: after the call, ``{sessionId, summary, history, timestamp}`` is posted to ``posthook.url``
(docs/playbooks.md, "posthook"), with an LLM summary when asked, retried with back-off on the runner's clock.
"""

from __future__ import annotations

import json

from twisted.internet import defer
from twisted.logger import Logger

from activecall.playbook import prompts
from activecall.playbook.tools import failure_text
from activecall.protocol import events as ev

log = Logger(namespace="activecall.playbook")

#: posthook delivery: attempts, first back-off (doubled each time), per-attempt timeout (seconds)
POSTHOOK_ATTEMPTS = 3
POSTHOOK_BACKOFF = 1.0
POSTHOOK_TIMEOUT = 10.0


@defer.inlineCallbacks
def deliver_posthook(runner):
    """Post ``runner``'s conversation to its playbook's posthook, if it has one; never fails for a
    delivery problem (logged), fires once delivered or given up."""
    hook = runner.config.posthook
    if hook is None:
        return
    session_id = runner.session.id
    conversation = [dict(m) for m in runner.history[1:]]
    summary = None
    if hook.summary:
        try:
            result = yield runner.llm.complete(
                [dict(m) for m in runner.history] + [{"role": "user", "content": prompts.summary_prompt(hook.summary)}])
            summary = result.content
        except Exception as e:
            log.warn("call {id}: posthook summary failed: {e}", id=session_id, e=str(e))
    body = json.dumps({
        "sessionId": session_id,
        "summary": summary,
        "history": conversation if hook.include_history else None,
        "timestamp": ev.rfc3339(runner.clock.seconds()),
    }, ensure_ascii=False).encode("utf-8")
    headers = {"Content-Type": "application/json", **dict(hook.headers)}
    delay = POSTHOOK_BACKOFF
    for attempt in range(1, POSTHOOK_ATTEMPTS + 1):
        try:
            status, text = yield runner.tools.call(hook.method.upper(), hook.url, body, headers, POSTHOOK_TIMEOUT)
            if 200 <= status < 300:
                log.info("call {id}: posthook delivered to {url}", id=session_id, url=hook.url)
                return
            why = f"HTTP {status}: {text[:200]}"
        except Exception as e:
            why = failure_text(e)
        log.warn("call {id}: posthook attempt {n} to {url} failed: {why}", id=session_id, n=attempt,
                 url=hook.url, why=why)
        if attempt < POSTHOOK_ATTEMPTS:
            yield _sleep(runner.clock, delay)
            delay *= 2
    log.error("call {id}: posthook to {url} given up after {n} attempts", id=session_id, url=hook.url,
              n=POSTHOOK_ATTEMPTS)


def _sleep(clock, seconds: float) -> defer.Deferred:
    d = defer.Deferred()
    clock.callLater(seconds, d.callback, None)
    return d
