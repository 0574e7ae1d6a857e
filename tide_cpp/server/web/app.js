// The page of `tide-cli serve`: a conversation over /v1/chat/completions (streamed), and the
// denoising canvas drawn from the stream's `tide.step` events (masks turning into tokens, and
// edits), with the answer's figures from `tide.stats`. Plain DOM, no dependencies.
"use strict";

const $ = (id) => document.getElementById(id);
const history = [];          // the conversation: {role, content}
let controller = null;       // aborts the running request (Stop): the server cancels it

function keyHeaders() {
  const h = { "Content-Type": "application/json" };
  const key = localStorage.getItem("tide-api-key");
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function loadModel() {
  try {
    const r = await fetch("/v1/models", { headers: keyHeaders() });
    if (r.status === 401) { $("keyrow").hidden = false; $("settings").open = true;
      $("model").textContent = "API key needed"; return; }
    const j = await r.json();
    $("model").textContent = j.data[0].id;
  } catch (e) { $("model").textContent = "server unreachable"; }
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  div.appendChild(body);
  $("messages").appendChild(div);
  $("messages").scrollTop = $("messages").scrollHeight;
  return div;
}

// ---- the canvas ------------------------------------------------------------------------------
const canvas = { cells: [], blocks: new Map() };

function resetCanvas() {
  $("canvas").textContent = "";
  canvas.cells = [];
  canvas.blocks = new Map();
  $("stepinfo").textContent = "";
}

function shown(text) {   // whitespace made visible in a cell
  if (text === "") return "\u00a0";
  return text.replace(/\n/g, "\u21b5").replace(/ /g, "\u00b7");
}

function blockRow(ev) {
  let row = canvas.blocks.get(ev.block);
  if (!row) {
    row = document.createElement("div");
    row.className = "block";
    row.dataset.label = "block " + ev.block;
    canvas.blocks.set(ev.block, row);
    $("canvas").appendChild(row);
    for (let i = ev.start; i < ev.end; i++) {
      const c = document.createElement("span");
      c.className = "cell mask";
      c.textContent = "\u2591";
      canvas.cells[i] = c;
      row.appendChild(c);
    }
  }
  return row;
}

function drawStep(ev) {
  blockRow(ev);
  for (const c of $("canvas").querySelectorAll(".fresh, .edit")) c.classList.remove("fresh", "edit");
  const eos = new Set(ev.eos);
  const put = (offset, text, kind) => {
    const c = canvas.cells[offset];
    if (!c) return;
    if (text === null) { c.className = "cell mask"; c.textContent = "\u2591"; return; }
    c.className = "cell tok " + kind + (eos.has(offset) ? " eos" : "");
    c.textContent = eos.has(offset) ? "eos" : shown(text);
  };
  for (const [o, t] of ev.unmasked) put(o, t, "fresh");
  for (const [o, t] of ev.edited) put(o, t, "edit");
  $("stepinfo").textContent = `block ${ev.block}, step ${ev.step + 1}, ${ev.masked} masked`;
  $("canvas").scrollTop = $("canvas").scrollHeight;
}

function figures(s) {
  const kib = (b) => (b / 1024).toFixed(1) + " KiB";
  return `${s.tokens} tokens in ${s.seconds.toFixed(2)} s (${s.tokens_per_second.toFixed(1)} tokens/s), ` +
         `${s.steps} steps over ${s.blocks} blocks; experts (${s.policy} on ${s.device}): ` +
         `promoted ${s.experts_promoted}, demoted ${s.experts_demoted}, moved ${kib(s.h2d_bytes)}`;
}

// ---- one request -----------------------------------------------------------------------------
function numberField(id) {
  const v = $(id).value.trim();
  return v === "" ? undefined : Number(v);
}

function requestBody() {
  const messages = [];
  const sys = $("system").value.trim();
  if (sys) messages.push({ role: "system", content: sys });
  messages.push(...history);
  const body = { model: $("model").textContent, messages, stream: true, denoise_events: true,
                 stream_options: { include_usage: true } };
  for (const f of ["max_tokens", "block_length", "steps", "threshold", "temperature"]) {
    const v = numberField(f);
    if (v !== undefined) body[f] = v;
  }
  return body;
}

// Server-sent events from a fetch body: yields {event, data} per event.
async function* events(response) {
  const reader = response.body.getReader();
  const dec = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += dec.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const raw = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      let name = "message", data = "";
      for (const line of raw.split("\n")) {
        if (line.startsWith("event: ")) name = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      yield { event: name, data };
    }
  }
}

async function ask(text) {
  history.push({ role: "user", content: text });
  addMessage("user", text);
  const reply = addMessage("assistant", "");
  const out = reply.querySelector(".text");
  resetCanvas();
  $("send").disabled = true;
  $("stop").disabled = false;
  $("status").textContent = "generating…";
  controller = new AbortController();
  let answer = "";
  try {
    const r = await fetch("/v1/chat/completions", { method: "POST", headers: keyHeaders(),
      body: JSON.stringify(requestBody()), signal: controller.signal });
    if (!r.ok) {
      const j = await r.json().catch(() => ({ error: { message: r.statusText } }));
      if (r.status === 401) { $("keyrow").hidden = false; $("settings").open = true; }
      throw new Error(j.error ? j.error.message : r.statusText);
    }
    for await (const ev of events(r)) {
      if (ev.data === "[DONE]") break;
      const j = JSON.parse(ev.data);
      if (ev.event === "tide.step") drawStep(j);
      else if (ev.event === "tide.stats") {
        $("stats").textContent = figures(j);
        const f = document.createElement("span");
        f.className = "figures";
        f.textContent = `${j.tokens_per_second.toFixed(1)} tokens/s · ${j.steps} steps · ` +
                        `${j.experts_promoted} experts moved`;
        reply.appendChild(f);
      } else if (j.error) throw new Error(j.error.message);
      else if (j.choices && j.choices.length && j.choices[0].delta.content) {
        answer += j.choices[0].delta.content;
        out.textContent = answer;
      }
    }
    history.push({ role: "assistant", content: answer });
    $("status").textContent = "";
  } catch (e) {
    history.pop();   // the question goes unanswered: keep it out of the next prompt
    if (e.name === "AbortError") { $("status").textContent = "stopped"; out.textContent = answer + " [stopped]"; }
    else { reply.classList.add("error"); out.textContent = e.message; $("status").textContent = "error"; }
  } finally {
    controller = null;
    $("send").disabled = false;
    $("stop").disabled = true;
  }
}

$("ask").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || controller) return;
  $("prompt").value = "";
  ask(text);
});
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("ask").requestSubmit(); }
});
$("stop").addEventListener("click", () => { if (controller) controller.abort(); });
$("clear").addEventListener("click", () => {
  history.length = 0; $("messages").textContent = ""; resetCanvas(); $("stats").textContent = "";
});
$("apikey").addEventListener("change", () => {
  localStorage.setItem("tide-api-key", $("apikey").value); loadModel();
});
loadModel();
