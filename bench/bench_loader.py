"""Micro-benchmark of the typed loaders (issue 19): ``to_wire`` over 100k events (the per-call hot
path), ``from_dict`` of an invite and a tts command, one playbook parse, one configuration load.
Best of 5 runs each; run it against two trees to compare:

    PYTHONPATH=src python bench/bench_loader.py
"""
import os
import tempfile
import timeit

from activecall.protocol import events as ev, commands as cmd
from activecall.config import load_config
from activecall.playbook.parser import parse_playbook

evs = [ev.AsrFinal(trackId="t1", timestamp=1700000000000 + i, index=i, text="hello world", startTime=1, endTime=2)
       for i in range(100)]
evs2 = [ev.TrackEnd(trackId="t1", timestamp=i, duration=100, ssrc=5, playId="p") for i in range(100)]
allev = (evs + evs2) * 500  # 100k

opt = {"caller": "sip:a@b", "callee": "sip:c@d", "codec": "pcmu", "denoise": True,
       "asr": {"provider": "tencent", "language": "zh", "secretKey": "x", "extra": {"a": "b"}},
       "tts": {"provider": "tencent", "speaker": "v", "speed": 1.0, "samplerate": 16000},
       "vad": {"type": "silero", "speechPadding": 250, "foo": 1},
       "sip": {"username": "u", "headers": {"X-A": "1"}, "extract_headers": ["X-B"]},
       "handshakeTimeout": "30s", "extra": {"k": "v"}}
invite = {"command": "invite", "option": opt}
tts = {"command": "tts", "text": "hello there", "playId": "p1", "autoHangup": False, "waitInputTimeout": 1000}

PB = """---
llm:
  provider: openai
  model: gpt-4o
  apiKey: k
  features: [http_tool]
tts:
  provider: tencent
  speaker: "101"
asr:
  provider: tencent
vad:
  type: silero
sip:
  hangup_headers: {X-A: "1"}
  extract_headers: [X-B, {name: X-C, pattern: "^a"}]
dtmf:
  "1": {action: goto, scene: b}
dtmfCollectors:
  pin: {digits: 4, validation: {pattern: "^[0-9]+$"}}
realtime:
  voice: alloy
followUp: {timeout: 10000, max: 2}
---
# Scene: a
hello
# Scene: b
bye
"""

def best(stmt, number, repeat=5):
    return min(timeit.repeat(stmt, number=number, repeat=repeat, globals=globals()))

n = len(allev)
t = best("for e in allev: e.to_dict()", 1)
print(f"to_wire x{n} events: {t*1e3:.1f} ms  ({t/n*1e9:.0f} ns/event)")
t = best("for e in allev: e.to_json()", 1)
print(f"to_json x{n} events: {t*1e3:.1f} ms  ({t/n*1e9:.0f} ns/event)")
t = best("cmd.command_from_dict(invite)", 10000)
print(f"invite from_dict: {t/10000*1e6:.1f} us")
t = best("cmd.command_from_dict(tts)", 100000)
print(f"tts from_dict: {t/100000*1e6:.2f} us")
t = best("parse_playbook(PB, environ={})", 200)
print(f"parse_playbook: {t/200*1e6:.0f} us")
d = tempfile.mkdtemp()
p = os.path.join(d, "c.toml")
open(p, "w").write('''addr = "127.0.0.1"
http_addr = "127.0.0.1:8080"
codecs = ["pcmu", "pcma"]
accept_timeout = "30s"
[handler]
type = "playbook"
default = "a.md"
[[handler.rules]]
playbook = "b.md"
caller = "^1"
[[register_users]]
server = "pbx:5060"
username = "u"
[register_users.credential]
username = "u"
password = "p"
[recording]
enabled = true
''')
t = best("load_config(p)", 1000)
print(f"load_config: {t/1000*1e6:.0f} us")
