"""``POST /api/calls``: place an outbound SIP call over REST.

The configuration guide overrides SRTP "in the HTTP API call body":
``{"callee": "sip:...", "sip": {"enableSrtp": true}}``.  The body may also
carry ``caller``, ``playbook`` (a name under ``playbook_dir`` or inline text
starting with ``---``) and ``option`` (a CallOption: asr, tts, vad, recorder,
…).  The answer is ``{"session_id": …}`` at once (201); the call's progress is
in its event journal, ``/list`` and its CDR.
"""

from __future__ import annotations

import json
import uuid

from twisted.web import resource

from activecall.protocol import commands as cmd
from activecall.protocol.events import WireError
from activecall.web.rest import send_json


class OriginateCall(resource.Resource):
    isLeaf = True

    def __init__(self, sip_calls):
        super().__init__()
        self.sip_calls = sip_calls

    def render_POST(self, request):
        try:
            body = json.loads(request.content.read() or b"{}")
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
            callee = body.get("callee")
            if not isinstance(callee, str) or not callee:
                raise ValueError("callee is required")
            option_dict = dict(body.get("option") or {})
            option_dict["callee"] = callee
            for key in ("caller", "sip", "playbook"):
                if key in body:
                    option_dict[key] = body[key]
            option = cmd.CallOption.from_dict(option_dict, "option")
        except (ValueError, WireError) as e:
            return send_json(request, {"error": str(e)}, 400)
        session_id = body.get("id") if isinstance(body.get("id"), str) else f"o.{uuid.uuid4()}"
        try:
            session = self.sip_calls.originate(session_id, option)
        except Exception as e:  # duplicate id, no SIP, no ports
            return send_json(request, {"error": str(e)}, 409 if "already active" in str(e) else 503)
        return send_json(request, {"session_id": session.id}, 201)
