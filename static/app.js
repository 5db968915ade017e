// slimchat page: talks to serve.py's POST /chat/completions (SSE) and GET /health.
// Every piece of model or user text reaches the DOM through textContent or createTextNode,
// never innerHTML, so nothing the model writes can inject markup (Markdown included).
"use strict";

const LIMITS = { temperature: [0, 2], top_k: [1, 200] };   // serve.py's ranges
const HELP = [
  "/temperature [v]  show or set the sampling temperature (0 to 2)",
  "/topk [v]         show or set top-k (1 to 200)",
  "/clear            start a new chat (also the + button, or Ctrl+Shift+N)",
  "/help             this list",
  "Edit on your message puts it back in the box; Regenerate on a reply asks again.",
].join("\n");

const state = {
  messages: [],            // {role: "user"|"assistant"|"notice"|"error", text | parts}
  settings: { temperature: 0.8, top_k: 50, max_tokens: 512 },
  controller: null,        // AbortController of the reply being streamed, if any
};

const $ = (id) => document.getElementById(id);
const el = (tag, cls, text) => {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
};

// ---------------------------------------------------------------------------
// Markdown: a small safe subset (fenced code, headings, lists, quotes, rules, tables, paragraphs;
// inline code, bold, italic, http(s) links), built as DOM nodes.

const INLINE = /(`[^`\n]+`)|(\*\*[^*\n]+\*\*)|(\*[^*\s][^*\n]*\*)|\[([^\]\n]+)\]\((https?:\/\/[^\s)]+)\)/g;

function renderInline(parent, text) {
  let last = 0;
  for (const m of text.matchAll(INLINE)) {
    if (m.index > last) parent.appendChild(document.createTextNode(text.slice(last, m.index)));
    if (m[1]) parent.appendChild(el("code", null, m[1].slice(1, -1)));
    else if (m[2]) parent.appendChild(el("strong", null, m[2].slice(2, -2)));
    else if (m[3]) parent.appendChild(el("em", null, m[3].slice(1, -1)));
    else {
      const a = el("a", null, m[4]);
      a.href = m[5];   // the pattern admits only http(s) URLs: no javascript: links
      a.target = "_blank";
      a.rel = "noopener noreferrer";
      parent.appendChild(a);
    }
    last = m.index + m[0].length;
  }
  if (last < text.length) parent.appendChild(document.createTextNode(text.slice(last)));
}

function codeBlock(lang, code) {
  const wrap = el("div", "code");
  const bar = el("div", "code-bar");
  bar.appendChild(el("span", null, lang || "code"));
  const copy = el("button", "ghost small", "Copy");
  copy.type = "button";
  copy.addEventListener("click", () => {
    navigator.clipboard?.writeText(code).then(() => { copy.textContent = "Copied"; });
  });
  bar.appendChild(copy);
  const pre = el("pre");
  pre.appendChild(el("code", null, code));
  wrap.append(bar, pre);
  return wrap;
}

const TABLE_RULE = /^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$/;   // | --- | :-: | --: |
const cells = (line) => line.trim().replace(/^\|/, "").replace(/\|$/, "").split("|").map((c) => c.trim());

function table(header, rule, rows) {
  const align = cells(rule).map((c) => (c.endsWith(":") ? (c.startsWith(":") ? "center" : "right") : ""));
  const wrap = el("div", "table"), t = el("table"), head = el("thead"), body = el("tbody");
  const row = (line, tag) => {
    const tr = el("tr");
    cells(line).slice(0, align.length).forEach((text, k) => {
      const cell = el(tag);
      if (align[k]) cell.style.textAlign = align[k];
      renderInline(cell, text);
      tr.appendChild(cell);
    });
    return tr;
  };
  head.appendChild(row(header, "th"));
  rows.forEach((line) => body.appendChild(row(line, "td")));
  t.append(head, body);
  wrap.appendChild(t);   // the wrapper scrolls sideways on a narrow screen
  return wrap;
}

function renderMarkdown(parent, text) {
  const lines = text.split("\n");
  let i = 0, para = [];
  const flush = () => {
    if (!para.length) return;
    const p = el("p");
    para.forEach((line, k) => {
      if (k) p.appendChild(el("br"));
      renderInline(p, line);
    });
    parent.appendChild(p);
    para = [];
  };
  while (i < lines.length) {
    const line = lines[i];
    let m;
    if ((m = line.match(/^\s*```\s*([\w+#.-]*)\s*$/))) {      // fenced code; unclosed = still streaming
      flush();
      const body = [];
      for (i++; i < lines.length && !/^\s*```\s*$/.test(lines[i]); i++) body.push(lines[i]);
      parent.appendChild(codeBlock(m[1], body.join("\n")));
      i++;
    } else if ((m = line.match(/^(#{1,6})\s+(.*)$/))) {
      flush();
      const h = el("h" + Math.min(m[1].length + 2, 6));
      renderInline(h, m[2]);
      parent.appendChild(h);
      i++;
    } else if (/^\s*([-*_])(\s*\1){2,}\s*$/.test(line)) {
      flush();
      parent.appendChild(el("hr"));
      i++;
    } else if (/^\s*([-*+]|\d+[.)])\s+/.test(line)) {
      flush();
      const ordered = /^\s*\d/.test(line);
      const list = el(ordered ? "ol" : "ul");
      for (; i < lines.length && /^\s*([-*+]|\d+[.)])\s+/.test(lines[i]); i++) {
        const li = el("li");
        renderInline(li, lines[i].replace(/^\s*([-*+]|\d+[.)])\s+/, ""));
        list.appendChild(li);
      }
      parent.appendChild(list);
    } else if (line.includes("|") && i + 1 < lines.length && TABLE_RULE.test(lines[i + 1])
               && lines[i + 1].includes("-") && cells(lines[i + 1]).length === cells(line).length) {
      flush();
      const rule = lines[i + 1], rows = [];
      for (i += 2; i < lines.length && lines[i].includes("|") && lines[i].trim(); i++) rows.push(lines[i]);
      parent.appendChild(table(line, rule, rows));
    } else if (/^\s*>/.test(line)) {
      flush();
      const quote = el("blockquote");
      const body = [];
      for (; i < lines.length && /^\s*>/.test(lines[i]); i++) body.push(lines[i].replace(/^\s*>\s?/, ""));
      renderMarkdown(quote, body.join("\n"));
      parent.appendChild(quote);
    } else if (!line.trim()) {
      flush();
      i++;
    } else {
      para.push(line);
      i++;
    }
  }
  flush();
}

// ---------------------------------------------------------------------------
// rendering the conversation

function renderParts(body, parts) {
  body.replaceChildren();
  for (const part of parts) {
    if (part.type === "text") {
      renderMarkdown(body, part.text);
    } else if (part.type === "python") {
      const box = el("div", "tool");
      box.appendChild(el("div", "tool-label", "tool call · calculator"));
      box.appendChild(el("code", "tool-code", part.text));
      body.appendChild(box);
    } else {
      const box = el("div", "tool tool-result");
      box.appendChild(el("div", "tool-label", "tool result"));
      box.appendChild(el("code", "tool-code", part.text));
      body.appendChild(box);
    }
  }
}

function fillReplyBody(body, msg) {
  renderParts(body, msg.parts);
  if (msg.streaming && !msg.parts.length) body.appendChild(el("span", "typing", "…"));
}

function messageNode(msg, index) {
  const node = el("div", "msg " + msg.role);
  node.dataset.index = index;
  const body = el("div", "body");
  node.appendChild(body);
  if (msg.role === "assistant") {
    fillReplyBody(body, msg);
    if (msg.note) node.appendChild(el("div", "note", msg.note));
  } else {
    body.textContent = msg.text;   // user text shows exactly as typed
  }
  if (msg.role === "user" || (msg.role === "assistant" && !msg.streaming)) {
    const actions = el("div", "actions");
    const button = el("button", "ghost small " + (msg.role === "user" ? "edit" : "regen"),
                      msg.role === "user" ? "Edit" : "Regenerate");
    button.type = "button";
    button.addEventListener("click", () => (msg.role === "user" ? editMessage(index) : regenerate(index)));
    actions.appendChild(button);
    node.appendChild(actions);
  }
  return node;
}

const STORE = "slimchat.messages";   // the conversation, kept across reloads until New chat

function save() {
  try {
    localStorage.setItem(STORE, JSON.stringify(state.messages));
  } catch { /* storage full or disabled: the page works without it */ }
}

function restore() {
  try {
    const saved = JSON.parse(localStorage.getItem(STORE) || "[]");
    if (Array.isArray(saved)) state.messages = saved.map((m) => ({ ...m, streaming: false }));
  } catch { localStorage.removeItem(STORE); }   // unreadable: start fresh
}

function render() {
  if (!state.controller) save();   // a streaming reply is saved once it ends
  const list = $("messages");
  list.replaceChildren(...state.messages.map(messageNode));
  if (!state.messages.length) {
    const empty = el("div", "empty");
    empty.appendChild(el("h2", null, "What's on your mind?"));
    empty.appendChild(el("p", null, "Replies stream from the model running in serve.py. Type /help for commands."));
    if (state.about) empty.appendChild(el("p", "about", state.about));   // what a tiny model knows
    list.appendChild(empty);
  }
  scrollDown();
}

let pending = false;
function renderLast() {   // at most one re-render of the streaming reply per frame
  if (pending) return;
  pending = true;
  requestAnimationFrame(() => {
    pending = false;
    const index = state.messages.length - 1;
    const msg = state.messages[index], old = $("messages").lastElementChild;
    // a frame asked for by the stream's last chunk can run after the stream ended: its full
    // render() has drawn the finished reply, and drawing it again would replace the nodes a
    // reader (a test, a screen reader) already holds
    if (!msg?.streaming) return;
    // refill the reply's body in place, so its message and body nodes stay the same while it
    // streams (a reader such as a test or a screen reader is not handed a node replaced every
    // frame); the note and Regenerate button come with the full render() when the stream ends
    if (old && old.dataset.index == index) fillReplyBody(old.querySelector(".body"), msg);
    else render();
    scrollDown();
  });
}

function scrollDown() {
  const chat = $("chat");
  chat.scrollTop = chat.scrollHeight;
}

function notice(text, role = "notice") {
  state.messages.push({ role, text });
  render();
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
}

// ---------------------------------------------------------------------------
// talking to the server

function payload() {
  const messages = [];
  for (const m of state.messages) {
    if (m.failed) continue;   // a turn the server never answered in full is not part of the chat
    if (m.role === "user") messages.push({ role: "user", content: m.text });
    else if (m.role === "assistant") {
      const plain = m.parts.every((p) => p.type === "text");
      messages.push({ role: "assistant", content: plain ? m.parts.map((p) => p.text).join("") : m.parts });
    }
  }
  return { messages, ...state.settings };
}

async function errorText(response) {
  try {
    const body = await response.json();
    return body.error?.message || response.statusText;
  } catch {
    return `HTTP ${response.status} ${response.statusText}`;
  }
}

function addPiece(msg, type, text) {
  const last = msg.parts[msg.parts.length - 1];
  if (last && last.type === type) last.text += text;
  else msg.parts.push({ type, text });
}

function handleEvent(msg, data) {
  if (data.error) msg.note = "error: " + data.error;
  else if (data.done) {
    if (data.finish_reason === "length") msg.note = "(stopped at the token limit)";
    if (data.trimmed_messages) msg.note = ((msg.note || "") +
      ` (the ${data.trimmed_messages} oldest messages did not fit the context and were left out)`).trim();
  } else if (typeof data.token === "string") addPiece(msg, data.type || "text", data.token);
}

async function generate() {
  const body = payload();
  const msg = { role: "assistant", parts: [], streaming: true };
  state.messages.push(msg);
  render();
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  try {
    const response = await fetch("chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body), signal: controller.signal,
    });
    if ($("status").classList.contains("bad")) checkHealth();   // it answered: it is back
    if (!response.ok) {
      // nothing was generated: take the turn back so the user can retry it
      const reason = await errorText(response);
      state.messages.pop();
      const user = state.messages.pop();
      if (user && !$("input").value) $("input").value = user.text;
      notice(reason, "error");
      return;
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "", ended = false;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const line = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        if (line.startsWith("data: ")) {
          const data = JSON.parse(line.slice(6));
          ended ||= Boolean(data.done || data.error);
          handleEvent(msg, data);
        }
      }
      renderLast();
    }
    if (!ended) throw new TypeError("the connection closed before the reply ended");
  } catch (err) {
    if (err.name === "AbortError") msg.note = "(stopped)";
    else lostServer(msg, err);
  } finally {
    msg.streaming = false;
    if (state.controller === controller) state.controller = null;
    setBusy(!!state.controller);
    render();
  }
}

function lostServer(msg, err) {
  // the server is unreachable or died mid-reply: say so, and give the typed text back to resend
  msg.note = `error: lost the server (${err.message}); your message is back in the box`;
  msg.failed = true;
  const user = state.messages[state.messages.indexOf(msg) - 1];
  if (user?.role === "user") {
    user.failed = true;
    if (!$("input").value) {
      $("input").value = user.text;
      autogrow();
    }
  }
  setStatus("server unreachable", false);
}

function stop() {
  if (state.controller) state.controller.abort();
}

function setStatus(text, ok) {
  const status = $("status");
  status.textContent = text;
  status.className = "status " + (ok ? "ok" : "bad");
}

async function checkHealth() {
  const banner = $("banner");
  try {
    const response = await fetch("health");
    const health = await response.json();
    if (health.defaults) Object.assign(state.settings, health.defaults);   // top_k null = no top-k
    if (health.ready) {
      if (health.about) { state.about = health.about; if (!state.messages.length) render(); }
      setStatus(health.model, true);
      banner.hidden = true;
    } else {
      setStatus("model not loaded", false);
      banner.textContent = "Model not loaded: " + (health.error || "unknown reason") +
        ". The page works, but replies will fail until serve.py is restarted with a checkpoint.";
      banner.hidden = false;
    }
  } catch (err) {
    setStatus("server unreachable", false);
    banner.textContent = "Cannot reach serve.py: " + err.message;
    banner.hidden = false;
  }
}

// ---------------------------------------------------------------------------
// user actions

function setting(name, label, arg, integer) {
  if (!arg) return notice(`${label} is ${state.settings[name] ?? "off"}`);
  const value = Number(arg);
  const [lo, hi] = LIMITS[name];
  if (!Number.isFinite(value) || value < lo || value > hi || (integer && !Number.isInteger(value))) {
    return notice(`${label} must be ${integer ? "an integer" : "a number"} from ${lo} to ${hi}, got "${arg}"`, "error");
  }
  state.settings[name] = value;
  notice(`${label} set to ${value}`);
}

function command(text) {
  const [name, arg] = text.trim().split(/\s+/, 2);
  if (name === "/temperature") setting("temperature", "temperature", arg, false);
  else if (name === "/topk") setting("top_k", "top-k", arg, true);
  else if (name === "/clear") newChat();
  else if (name === "/help") notice(HELP);
  else notice(`unknown command ${name}; try /help`, "error");
}

function send(event) {
  event?.preventDefault();
  const input = $("input");
  const text = input.value;
  if (!text.trim() || state.controller) return;
  input.value = "";
  autogrow();
  if (text.trim().startsWith("/")) return command(text);
  state.messages.push({ role: "user", text });
  generate();
}

function conversationUpTo(index) {   // drop message `index` and everything after it
  stop();
  state.messages = state.messages.slice(0, index);
}

function editMessage(index) {
  const text = state.messages[index].text;
  conversationUpTo(index);
  render();
  const input = $("input");
  input.value = text;
  autogrow();
  input.focus();
}

function regenerate(index) {
  conversationUpTo(index);
  // the reply answers the last user message; notices in between are not part of the chat
  while (state.messages.length && state.messages[state.messages.length - 1].role !== "user") state.messages.pop();
  if (!state.messages.length) return render();
  generate();
}

function newChat() {
  stop();
  state.messages = [];
  render();
  $("input").focus();
}

function autogrow() {
  const input = $("input");
  input.style.height = "auto";
  const border = input.offsetHeight - input.clientHeight;   // the height set includes it (border-box)
  input.style.height = Math.min(input.scrollHeight + border, 200) + "px";
  input.style.overflowY = input.scrollHeight > 200 ? "auto" : "hidden";   // a scrollbar only once capped
}

document.addEventListener("DOMContentLoaded", () => {
  const input = $("input");
  $("composer").addEventListener("submit", send);
  $("stop").addEventListener("click", stop);
  $("new-chat").addEventListener("click", newChat);
  input.addEventListener("input", autogrow);
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) send(e);
  });
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape") stop();
    if (e.ctrlKey && e.shiftKey && e.key.toLowerCase() === "n") { e.preventDefault(); newChat(); }
  });
  restore();
  render();
  autogrow();
  checkHealth();
  input.focus();
});
