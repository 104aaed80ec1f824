// activecall browser console: playbooks, a WebRTC call with a live timeline, active calls, history.
// Plain JS, no build step.  Every API call carries the token from localStorage
// (Authorization: Bearer on fetch, ?token= on the WebSocket, which cannot send headers).
"use strict";

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "activecall.token";
const state = { pc: null, ws: null, stream: null, callId: null, selected: null, polling: null,
                recordingUrl: null };
window.activecall = state;  // for the browser tests and for poking around in DevTools

function token() { return localStorage.getItem(TOKEN_KEY) || ""; }

function notice(text) {
  const el = $("notice");
  el.textContent = text || "";
  el.hidden = !text;
}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (token()) headers["Authorization"] = "Bearer " + token();
  const response = await fetch(path, Object.assign({}, options, { headers }));
  if (response.status === 401) {
    notice("The daemon wants an API token (http_token): enter it above and press Save.");
    throw new Error("unauthorized");
  }
  return response;
}

async function apiJson(path) {
  const response = await api(path);
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
  return response.json();
}

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child instanceof Node ? child : String(child ?? ""));
  return node;
}

// -- playbooks ---------------------------------------------------------------------------------------

async function loadPlaybooks() {
  let entries;
  try { entries = await apiJson("/api/playbooks"); } catch (e) { return; }
  const list = $("playbooks");
  const select = $("call-playbook");
  const chosen = select.value;
  list.replaceChildren();
  select.replaceChildren(el("option", { value: "" }, "(none)"));
  for (const entry of entries) {
    const item = el("li", { "data-name": entry.name, onclick: () => openPlaybook(entry.name) },
                    el("span", {}, entry.name), el("span", { class: "muted" }, entry.updated.slice(0, 19)));
    if (entry.name === state.selected) item.classList.add("selected");
    list.append(item);
    select.append(el("option", { value: entry.name }, entry.name));
  }
  if (state.playbookChosen && [...select.options].some((o) => o.value === chosen)) select.value = chosen;
  else if (entries.length) select.value = entries[0].name;  // a first visit: the first playbook
}

async function openPlaybook(name) {
  const response = await api("/api/playbooks/" + encodeURIComponent(name));
  if (!response.ok) { $("playbook-status").textContent = `${name}: ${await response.text()}`; return; }
  state.selected = name;
  $("playbook-name").value = name;
  $("playbook-text").value = await response.text();
  $("playbook-status").textContent = `Loaded ${name}`;
  for (const li of $("playbooks").children) li.classList.toggle("selected", li.dataset.name === name);
}

async function savePlaybook() {
  let name = $("playbook-name").value.trim();
  if (!name) { $("playbook-status").textContent = "Give the playbook a name."; return; }
  if (!name.endsWith(".md")) name += ".md";
  const response = await api("/api/playbooks/" + encodeURIComponent(name),
                             { method: "POST", body: $("playbook-text").value });
  if (!response.ok) { $("playbook-status").textContent = `Not saved: ${await response.text()}`; return; }
  state.selected = name;
  $("playbook-name").value = name;
  $("playbook-status").textContent = `Saved ${name} at ${new Date().toLocaleTimeString()}`;
  await loadPlaybooks();
}

function newPlaybook() {
  state.selected = null;
  $("playbook-name").value = "";
  $("playbook-text").value = "---\nllm: {provider: echo}\nasr: {provider: pocketsphinx}\n" +
    "vad: {type: webrtcvad}\ntts: {provider: flite}\ngreeting: Hello! Say something and I will repeat it.\n---\n" +
    "You are a helpful phone assistant.\n";
  $("playbook-status").textContent = "New playbook: name it and press Save.";
}

// -- the call ----------------------------------------------------------------------------------------

function setCallState(text, cls = "") {
  const node = $("call-state");
  node.textContent = text;
  node.className = "state " + cls;
}

function summary(event) {
  switch (event.event) {
    case "answer": return `${event.sdp ? event.sdp.length + " bytes of SDP" : ""}`;
    case "asrFinal": case "asrDelta": return `“${event.text}”`;
    case "trackStart": return `${event.trackId}${event.playId ? " play " + event.playId : ""}`;
    case "trackEnd": return `${event.trackId}${event.playId ? " play " + event.playId : ""} ${event.duration} ms`;
    case "dtmf": return `digit ${event.digit}`;
    case "metrics": return event.key === "turn.latency" ? turnLatency(event.data || {})
                                                        : `${event.key} ${event.duration} ms`;
    case "error": return `${event.sender}: ${event.error}`;
    case "hangup": return `${event.reason || ""} by ${event.initiator || "?"}`;
    case "addHistory": return `${event.speaker}: ${event.text}`;
    case "speaking": case "silence": return event.trackId || "";
    default: {
      const rest = Object.assign({}, event);
      delete rest.event; delete rest.timestamp; delete rest.trackId;
      return JSON.stringify(rest);
    }
  }
}

// one turn's latency (metrics turn.latency, docs/api.md): every stage from the end of the caller's speech
function turnLatency(d) {
  const stage = (label, ms) => (ms === null || ms === undefined ? "" : ` · ${label} ${ms}`);
  return `reply after ${d.first_frame_ms} ms` + stage("end of turn", d.eou_ms) + stage("asr final", d.asr_final_ms) +
    stage("llm 1st token", d.llm_first_token_ms) + stage("tts 1st audio", d.tts_first_audio_ms);
}

function addTimeline(event, local = false) {
  const when = new Date(event.timestamp || Date.now());
  const turn = event.event === "metrics" && event.key === "turn.latency" ? " turn-latency" : "";
  const item = el("li", { class: `${event.event}${turn}${local ? " local" : ""}` },
                  el("span", { class: "t" }, when.toTimeString().slice(0, 8)),
                  el("span", { class: "ev" }, event.event),
                  el("span", {}, local ? event.text : summary(event)));
  const list = $("timeline");
  list.append(item);
  list.scrollTop = list.scrollHeight;
}

function newCallId() {
  const random = (crypto.randomUUID && crypto.randomUUID()) ||
    Math.random().toString(16).slice(2) + Date.now().toString(16);
  return "s." + random;
}

async function iceServers() {
  try {
    const servers = await apiJson("/iceservers");
    return servers.map((s) => {
      const out = { urls: s.urls };
      if (s.username) out.username = s.username;
      if (s.credential) out.credential = s.credential;
      return out;
    });
  } catch (e) { return []; }
}

function gatheringDone(pc, ms) {
  // Send a complete offer (every host candidate), but never wait on an unreachable STUN server for long.
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    pc.addEventListener("icegatheringstatechange", () => {
      if (pc.iceGatheringState === "complete") { clearTimeout(timer); resolve(); }
    });
  });
}

async function startCall() {
  if (state.pc) return;
  notice("");
  $("timeline").replaceChildren();
  $("call-start").disabled = true;
  setCallState("starting");
  try {
    state.stream = await navigator.mediaDevices.getUserMedia({ audio: true });
  } catch (e) {
    notice(`No microphone: ${e.message}. WebRTC needs https:// or http://127.0.0.1.`);
    $("call-start").disabled = false;
    setCallState("idle");
    return;
  }
  const pc = new RTCPeerConnection({ iceServers: await iceServers() });
  state.pc = pc;
  state.stream.getTracks().forEach((track) => pc.addTrack(track, state.stream));
  pc.addEventListener("track", (e) => { $("remote-audio").srcObject = e.streams[0] || new MediaStream([e.track]); });
  pc.addEventListener("connectionstatechange", () => {
    addTimeline({ event: "webrtc", text: pc.connectionState }, true);
    if (pc.connectionState === "connected") { setCallState("connected", "connected"); keypad(true); }
    if (pc.connectionState === "failed") { setCallState("failed", "failed"); endCall(); }
  });
  await pc.setLocalDescription(await pc.createOffer());
  await gatheringDone(pc, 2000);

  const id = newCallId();
  state.callId = id;
  $("call-id").textContent = id;
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const query = `id=${encodeURIComponent(id)}` + (token() ? `&token=${encodeURIComponent(token())}` : "");
  const ws = new WebSocket(`${scheme}://${location.host}/call/webrtc?${query}`);
  state.ws = ws;
  ws.addEventListener("open", () => {
    const option = { offer: pc.localDescription.sdp, codec: $("call-codec").value };
    if ($("call-playbook").value) option.playbook = $("call-playbook").value;
    ws.send(JSON.stringify({ command: "invite", option }));
    addTimeline({ event: "invite", text: `codec ${option.codec}${option.playbook ? ", playbook " + option.playbook : ""}` }, true);
    $("call-hangup").disabled = false;
    $("say").disabled = false;
  });
  ws.addEventListener("message", async (message) => {
    if (typeof message.data !== "string") return;
    const event = JSON.parse(message.data);
    addTimeline(event);
    if (event.event === "answer" && event.sdp && pc.signalingState === "have-local-offer") {
      setCallState("connecting");
      await pc.setRemoteDescription({ type: "answer", sdp: event.sdp });
    } else if (event.event === "hangup") {
      setCallState("ended", "ended");
    }
  });
  ws.addEventListener("close", (e) => {
    addTimeline({ event: "closed", text: `control socket closed (${e.code})` }, true);
    if (e.code === 1006 || e.code === 4009) notice(`The call socket closed (${e.code}); is the token right?`);
    endCall();
  });
  refreshCalls();
}

function hangUp() {
  if (state.ws && state.ws.readyState === WebSocket.OPEN) {
    state.ws.send(JSON.stringify({ command: "hangup", initiator: "caller" }));
  } else {
    endCall();
  }
}

function say() {
  const text = $("say-text").value.trim();
  if (!text || !state.ws || state.ws.readyState !== WebSocket.OPEN) return;
  state.says = (state.says || 0) + 1;
  state.ws.send(JSON.stringify({ command: "tts", text, playId: `say-${state.says}`, endOfStream: true }));
  $("say-text").value = "";
}

function keypad(enabled) {
  document.querySelectorAll("#keypad button").forEach((b) => { b.disabled = !enabled; });
}

function pressKey(digit) {
  // RFC 4733 telephone-events in the call's audio stream, as a phone sends them; the daemon
  // answers each press with a dtmf event, which shows in the timeline
  const sender = state.pc && state.pc.getSenders().find((s) => s.track && s.track.kind === "audio");
  if (!sender || !sender.dtmf || !sender.dtmf.canInsertDTMF) {
    notice("This call cannot send DTMF (no telephone-event was negotiated).");
    return;
  }
  sender.dtmf.insertDTMF(digit, 120, 70);
  addTimeline({ event: "key", text: `pressed ${digit}` }, true);
}

function endCall() {
  if (state.pc) { state.pc.close(); state.pc = null; }
  if (state.stream) { state.stream.getTracks().forEach((t) => t.stop()); state.stream = null; }
  if (state.ws && state.ws.readyState <= WebSocket.OPEN) state.ws.close();
  state.ws = null;
  if (!/ended|failed/.test($("call-state").className)) setCallState("ended", "ended");
  $("call-start").disabled = false;
  $("call-hangup").disabled = true;
  $("say").disabled = true;
  keypad(false);
  setTimeout(() => { refreshCalls(); refreshHistory(); refreshHealth(); }, 500);
}

// -- active calls and history ------------------------------------------------------------------------

async function refreshCalls() {
  let body;
  try { body = await apiJson("/list"); } catch (e) { return; }
  const rows = (body.active_calls || []).map((call) => el("tr", { "data-id": call.id },
    el("td", {}, call.id), el("td", {}, call.callType), el("td", {}, (call.startTime || "").slice(11, 19)),
    el("td", {}, el("button", { class: "small danger", onclick: () => kill(call.id) }, "Kill"))));
  $("active-calls").tBodies[0].replaceChildren(...rows);
}

async function kill(id) {
  try { await api("/kill/" + encodeURIComponent(id)); } catch (e) { return; }
  refreshCalls();
}

async function refreshHistory() {
  let records, recordings;
  try {
    [records, recordings] = await Promise.all([apiJson("/api/records"), apiJson("/api/recordings")]);
  } catch (e) { return; }
  const wavs = new Set(recordings.map((r) => r.name));
  const rows = records.slice(0, 50).map((record) => {
    const wav = record.id.replace(/[^A-Za-z0-9._-]/g, "_") + ".wav";
    const play = wavs.has(wav)
      ? el("button", { class: "small", onclick: () => playRecording(wav, record.id) }, "Play")
      : el("span", { class: "muted" }, "no recording");
    return el("tr", { "data-id": record.id }, el("td", {}, record.id), el("td", {}, record.date.slice(0, 19).replace("T", " ")),
              el("td", {}, record.duration), el("td", {}, record.status), el("td", {}, play));
  });
  $("history").tBodies[0].replaceChildren(...rows);
}

async function playRecording(name, id) {
  // fetched (not an <audio src>) so the token goes in the Authorization header
  const response = await api("/api/recordings/" + encodeURIComponent(name));
  if (!response.ok) { notice(`Recording ${name}: HTTP ${response.status}`); return; }
  const bytes = await response.arrayBuffer();
  if (state.recordingUrl) URL.revokeObjectURL(state.recordingUrl);
  state.recordingUrl = URL.createObjectURL(new Blob([bytes], { type: "audio/wav" }));
  $("player").hidden = false;
  $("player-title").textContent = `${id} (left: caller, right: bot)`;
  $("recording-audio").src = state.recordingUrl;
  const context = new (window.AudioContext || window.webkitAudioContext)();
  try {
    drawWaveform(await context.decodeAudioData(bytes.slice(0)));
  } catch (e) {
    notice(`Cannot decode ${name}: ${e.message}`);
  } finally {
    context.close();
  }
}

function drawWaveform(buffer) {
  const canvas = $("waveform");
  const width = canvas.width = canvas.clientWidth || 560;
  const height = canvas.height;
  const g = canvas.getContext("2d");
  g.fillStyle = "#10151f";
  g.fillRect(0, 0, width, height);
  const colours = ["#4ade80", "#60a5fa"];
  const lanes = buffer.numberOfChannels;
  for (let c = 0; c < lanes; c++) {
    const data = buffer.getChannelData(c);
    const mid = (c + 0.5) * height / lanes;
    const half = height / lanes / 2 - 2;
    const step = Math.max(1, Math.floor(data.length / width));
    g.strokeStyle = colours[c % colours.length];
    g.beginPath();
    for (let x = 0; x < width; x++) {
      let lo = 0, hi = 0;
      for (let i = x * step; i < Math.min(data.length, (x + 1) * step); i++) {
        if (data[i] < lo) lo = data[i];
        if (data[i] > hi) hi = data[i];
      }
      g.moveTo(x + 0.5, mid - hi * half);
      g.lineTo(x + 0.5, mid - lo * half + 1);
    }
    g.stroke();
  }
  canvas.dataset.drawn = String(buffer.duration.toFixed(2));
}

async function refreshHealth() {
  try {
    const health = await (await fetch("/health")).json();
    $("health").textContent = `v${health.version} · ${health.active_calls} active · up ${Math.round(health.uptime)} s`;
  } catch (e) {
    $("health").textContent = "daemon unreachable";
  }
}

// -- start-up ----------------------------------------------------------------------------------------

function init() {
  $("token").value = token();
  $("token-save").addEventListener("click", () => {
    localStorage.setItem(TOKEN_KEY, $("token").value.trim());
    notice("");
    refreshAll();
  });
  $("playbook-save").addEventListener("click", savePlaybook);
  $("playbook-new").addEventListener("click", newPlaybook);
  $("call-start").addEventListener("click", startCall);
  $("call-playbook").addEventListener("change", () => { state.playbookChosen = true; });
  $("call-hangup").addEventListener("click", hangUp);
  $("say").addEventListener("click", say);
  $("say-text").addEventListener("keydown", (e) => { if (e.key === "Enter") say(); });
  $("history-refresh").addEventListener("click", refreshHistory);
  document.querySelectorAll("#keypad button").forEach((b) => b.addEventListener("click", () => pressKey(b.dataset.digit)));
  if (!window.isSecureContext) notice("This page is not a secure context: the microphone and WebRTC need https:// or http://127.0.0.1.");
  refreshAll();
  state.polling = setInterval(() => { refreshCalls(); refreshHealth(); }, 2000);
}

function refreshAll() {
  refreshHealth();
  loadPlaybooks();
  refreshCalls();
  refreshHistory();
}

init();
