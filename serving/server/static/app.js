// sessionserve web chat: vanilla JS over the public /v1 API (no framework, no build step).
// Text from the server is only ever set with textContent, never parsed as HTML.
"use strict";

const API = new URL("v1/", document.baseURI); // relative to the page, so any route prefix works
const KEY_ITEM = "sessionserve.apiKey"; // sessionStorage: this tab only, gone when it closes
const STATS_PREFIX = "sessionserve.turns."; // + session id -> {index of the reply in the history: turn stats}
const PAGE_SIZE = 50;

const $ = (id) => document.getElementById(id);
const state = { sessions: [], nextOffset: null, current: null, info: null, messages: 0, busy: false };

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

// ---- HTTP: the one place that adds the key, asks for it on 401 and reads the error envelope ----------------------
let keyPrompt = null; // the open key dialog, shared by requests that get 401 at the same time

function askForKey(message) {
  if (keyPrompt === null) {
    keyPrompt = new Promise((resolve) => {
      const dialog = $("key-dialog");
      $("key-message").textContent = message;
      $("key-input").value = "";
      dialog.returnValue = "";
      dialog.addEventListener(
        "close",
        () => {
          keyPrompt = null;
          const key = $("key-input").value.trim();
          if (dialog.returnValue === "save" && key) sessionStorage.setItem(KEY_ITEM, key);
          resolve(dialog.returnValue === "save" && key !== "");
        },
        { once: true },
      );
      dialog.showModal();
    });
  }
  return keyPrompt;
}

async function errorOf(response) {
  try {
    const { error } = await response.json();
    return new ApiError(response.status, error.code, error.message);
  } catch {
    return new ApiError(response.status, "http_error", `${response.status} ${response.statusText}`);
  }
}

async function request(path, { method = "GET", body } = {}) {
  for (;;) {
    const headers = {};
    const key = sessionStorage.getItem(KEY_ITEM);
    if (key) headers.authorization = `Bearer ${key}`;
    if (body !== undefined) headers["content-type"] = "application/json";
    const init = { method, headers, body: body === undefined ? undefined : JSON.stringify(body) };
    const response = await fetch(new URL(path, API), init);
    if (response.ok) return response;
    const error = await errorOf(response);
    if (response.status === 401 && (await askForKey(`${error.message}: enter an API key of this server.`))) continue;
    throw error;
  }
}

async function api(path, options) {
  const response = await request(path, options);
  return response.status === 204 ? null : response.json();
}

const sessionPath = (sid, rest = "") => `sessions/${encodeURIComponent(sid)}${rest}`;

// Server-Sent Events of a query with stream: true: `delta` {text}, then `done` {QueryResponse} or `error`.
async function* sseEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
      }
      if (data.length) yield { name, data: JSON.parse(data.join("\n")) };
    }
  }
}

// ---- rendering --------------------------------------------------------------------------------------------------
const titleOf = (s) =>
  typeof s.metadata?.title === "string" && s.metadata.title ? s.metadata.title : `Session ${s.session_id.slice(0, 8)}`;

const kvText = (kv) => (kv.tier === "none" ? "no KV held" : `KV on ${kv.tier} (${kv.tokens} tokens)`);

function showError(error) {
  const box = $("error");
  box.textContent = error instanceof ApiError ? `${error.message} (${error.code})` : String(error.message ?? error);
  box.hidden = false;
}

function clearError() {
  $("error").hidden = true;
}

function renderSessions() {
  const list = $("sessions");
  list.replaceChildren(
    ...state.sessions.map((s) => {
      const item = document.createElement("li");
      const button = document.createElement("button");
      button.type = "button";
      button.className = "session";
      button.dataset.sessionId = s.session_id;
      if (s.session_id === state.current) button.setAttribute("aria-current", "true");
      const title = document.createElement("span");
      title.className = "title";
      title.textContent = titleOf(s);
      const meta = document.createElement("span");
      meta.className = "meta";
      meta.textContent = `${kvText(s.kv)} · ${new Date(s.last_active_at * 1000).toLocaleString()}`;
      button.disabled = state.busy;
      button.append(title, meta);
      // busy(): Rename, Fork, Delete and Send act on state.info, which is the previous session until this one loads.
      button.addEventListener("click", () => busy(() => select(s.session_id)));
      item.append(button);
      return item;
    }),
  );
  $("more-sessions").hidden = state.nextOffset === null;
}

function statsText(stats) {
  const kv = stats.kv ? ` · ${kvText(stats.kv)}` : "";
  const replica = stats.replica ? ` · replica ${stats.replica}` : "";
  return (
    `cached ${stats.cached_tokens} of ${stats.prompt_tokens} prompt tokens · TTFT ${Math.round(stats.ttft_ms)} ms · ` +
    `${stats.completion_tokens} tokens in ${Math.round(stats.total_ms)} ms${kv}${replica}`
  );
}

function renderMessage(role, content, stats) {
  const item = document.createElement("li");
  item.className = `message ${role}`;
  const text = document.createElement("div");
  text.className = "content";
  text.textContent = content;
  item.append(text);
  if (stats) showStats(item, stats);
  $("messages").append(item);
  item.scrollIntoView({ block: "end" });
  return item;
}

function showStats(item, stats) {
  const footer = document.createElement("div");
  footer.className = "turn-stats";
  footer.dataset.cachedTokens = stats.cached_tokens;
  footer.dataset.ttftMs = stats.ttft_ms;
  footer.dataset.kvTier = stats.kv ? stats.kv.tier : "";
  footer.textContent = statsText(stats);
  item.append(footer);
}

function renderHeader() {
  const info = state.info;
  $("chat-title").textContent = info ? titleOf(info) : "No session selected";
  $("chat-kv").textContent = info ? kvText(info.kv) : "";
  const none = info === null || state.busy;
  for (const id of ["rename", "fork", "delete", "send", "prompt"]) $(id).disabled = none;
  // One action at a time: no switching sessions while a reply streams into this one.
  for (const button of document.querySelectorAll("#new-session, #sessions .session")) button.disabled = state.busy;
}

// ---- per-turn stats, kept in this tab so a reload still shows them -----------------------------------------------
function loadStats(sid) {
  return JSON.parse(sessionStorage.getItem(STATS_PREFIX + sid) ?? "{}");
}

function saveStats(sid, index, stats) {
  const all = loadStats(sid);
  all[index] = stats;
  sessionStorage.setItem(STATS_PREFIX + sid, JSON.stringify(all));
}

// ---- actions ----------------------------------------------------------------------------------------------------
async function loadSessions(more = false) {
  const offset = more ? state.nextOffset : 0;
  const page = await api(`sessions?limit=${PAGE_SIZE}&offset=${offset}`);
  state.sessions = more ? [...state.sessions, ...page.sessions] : page.sessions;
  state.nextOffset = page.next_offset;
  renderSessions();
}

async function select(sid) {
  const [info, log] = await Promise.all([api(sessionPath(sid)), api(sessionPath(sid, "/messages"))]);
  state.current = sid;
  state.info = info;
  state.messages = log.messages.length;
  history.replaceState(null, "", `#${encodeURIComponent(sid)}`);
  const stats = loadStats(sid);
  $("messages").replaceChildren();
  log.messages.forEach((m, i) => renderMessage(m.role, m.content, stats[i]));
  renderHeader();
  renderSessions();
  $("prompt").focus();
}

async function createSession() {
  const info = await api("sessions", { method: "POST", body: {} });
  await loadSessions();
  await select(info.session_id);
}

async function forkSession() {
  const parent = state.info;
  const child = await api(sessionPath(parent.session_id, "/fork"), { method: "POST", body: {} });
  const metadata = { ...child.metadata, title: `${titleOf(parent)} (fork)` };
  await api(sessionPath(child.session_id), { method: "PATCH", body: { metadata } });
  await loadSessions();
  await select(child.session_id);
}

async function rename(title) {
  const info = state.info;
  const metadata = { ...info.metadata, title };
  state.info = await api(sessionPath(info.session_id), { method: "PATCH", body: { metadata } });
  renderHeader();
  await loadSessions();
}

async function deleteSession() {
  const info = state.info;
  if (!confirm(`Delete "${titleOf(info)}"? Its history and KV cache are freed.`)) return;
  await api(sessionPath(info.session_id), { method: "DELETE" });
  sessionStorage.removeItem(STATS_PREFIX + info.session_id);
  state.current = null;
  state.info = null;
  history.replaceState(null, "", location.pathname + location.search);
  $("messages").replaceChildren();
  renderHeader();
  await loadSessions();
}

async function send(prompt) {
  const sid = state.current;
  const replyIndex = state.messages + 1; // the reply's index in the stored history once the turn is committed
  const body = {
    prompt,
    max_new_tokens: Number.parseInt($("max-new-tokens").value, 10),
    temperature: Number.parseFloat($("temperature").value),
    stream: true,
  };
  const asked = renderMessage("user", prompt);
  const reply = renderMessage("assistant", "");
  const text = reply.querySelector(".content");
  reply.classList.add("streaming");
  try {
    const response = await request(sessionPath(sid, "/query"), { method: "POST", body });
    let result = null;
    for await (const event of sseEvents(response)) {
      if (event.name === "delta") {
        text.textContent += event.data.text;
        reply.scrollIntoView({ block: "end" });
      } else if (event.name === "done") {
        result = event.data;
      } else if (event.name === "error") {
        throw new ApiError(0, event.data.error.code, event.data.error.message);
      }
    }
    // The stream closes only after the server released the turn, so the edits below never meet session_busy.
    if (result === null) throw new Error("the reply stream ended before its result: nothing was stored");
    reply.classList.remove("streaming");
    text.textContent = result.response;
    const info = await api(sessionPath(sid));
    const replica = response.headers.get("x-sessionserve-replica");
    const stats = { ...result.usage, ...result.timing, kv: info.kv, replica };
    saveStats(sid, replyIndex, stats);
    showStats(reply, stats);
    state.messages += 2;
    state.info = info;
    if (typeof info.metadata?.title !== "string") await rename(prompt.replace(/\s+/g, " ").slice(0, 60));
    renderHeader();
    await loadSessions();
  } catch (error) {
    // A failed or cut turn is not stored by the server: take it off the page and give the prompt back.
    asked.remove();
    reply.remove();
    $("prompt").value = prompt;
    throw error;
  }
}

// Run one user action: one at a time, errors shown in the banner.
async function run(action) {
  clearError();
  try {
    await action();
  } catch (error) {
    showError(error);
  }
}

async function busy(action) {
  state.busy = true;
  renderHeader();
  try {
    await run(action);
  } finally {
    state.busy = false;
    renderHeader();
    if (state.current !== null) $("prompt").focus();
  }
}

function startRename() {
  const input = $("title-input");
  input.value = titleOf(state.info);
  $("chat-title").hidden = true;
  input.hidden = false;
  input.focus();
  input.select();
}

function endRename(save) {
  const input = $("title-input");
  if (input.hidden) return; // Enter already ended it; this is the blur that follows
  input.hidden = true;
  $("chat-title").hidden = false;
  const title = input.value.trim();
  if (save && title && title !== titleOf(state.info)) run(() => rename(title));
}

function wire() {
  $("new-session").addEventListener("click", () => busy(createSession));
  $("more-sessions").addEventListener("click", () => run(() => loadSessions(true)));
  $("fork").addEventListener("click", () => busy(forkSession));
  $("delete").addEventListener("click", () => busy(deleteSession));
  $("rename").addEventListener("click", startRename);
  $("title-input").addEventListener("keydown", (event) => {
    if (event.key === "Enter") endRename(true);
    else if (event.key === "Escape") endRename(false);
  });
  $("title-input").addEventListener("blur", () => endRename(true));
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const prompt = $("prompt").value.trim();
    if (!prompt || state.busy || state.current === null) return;
    $("prompt").value = "";
    busy(() => send(prompt));
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("error").addEventListener("click", clearError);
}

async function boot() {
  wire();
  renderHeader();
  await run(async () => {
    await loadSessions();
    const sid = decodeURIComponent(location.hash.slice(1));
    if (sid) await select(sid);
  });
}

boot();
