// The chat page: conversations, streaming replies, stop / regenerate / edit / copy, settings, raw mode.
// Model text reaches the page only through renderMarkdown (DOM nodes) or textContent.

import { fitChat, fitPrompt } from "./context.js";
import { renderMarkdown } from "./markdown.js";
import { readEvents } from "./sse.js";
import * as store from "./store.js";

const $ = (selector) => document.querySelector(selector);
const ui = {
  sidebar: $("#sidebar"),
  scrim: $("#scrim"),
  history: $("#history"),
  messages: $("#messages"),
  empty: $("#empty-state"),
  input: $("#input"),
  composer: $("#composer"),
  send: $("#send"),
  stop: $("#stop"),
  mode: $("#mode"),
  model: $("#model-name"),
  banner: $("#error-banner"),
  settings: $("#settings"),
  settingsForm: $("#settings-form"),
  theme: $("#theme-toggle"),
};

let settings = store.loadSettings();
let conversations = store.loadConversations();
let current = conversations.find((c) => c.id === store.loadCurrentId()) || store.newConversation("chat");
let active = null;  // {controller, conversation} while a reply streams
let modelName = "nanochat";

// ---------------------------------------------------------------------------------------------------------
// Theme: "auto" follows the system and is resolved here, so the CSS only knows light and dark.

const systemDark = window.matchMedia("(prefers-color-scheme: dark)");
let theme = store.loadTheme();

function applyTheme() {
  const resolved = theme === "auto" ? (systemDark.matches ? "dark" : "light") : theme;
  document.documentElement.dataset.theme = resolved;
  ui.theme.title = `Theme: ${theme}`;
}

// ---------------------------------------------------------------------------------------------------------
// Errors and small helpers

function showError(message) {
  ui.banner.querySelector(".text").textContent = message;
  ui.banner.hidden = false;
}

function hideError() {
  ui.banner.hidden = true;
}

async function describeError(response) {
  let message = response.statusText || "request failed";
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch {
    // not JSON: keep the status text
  }
  const hints = {
    401: " — set the API key in Settings (⚙)",
    429: ` — the server is busy; retry in ${response.headers.get("Retry-After") || "a few"} s`,
    503: " — the model is not ready yet",
  };
  return `Error ${response.status}: ${message}${hints[response.status] || ""}`;
}

function authHeaders() {
  const headers = { "Content-Type": "application/json" };
  if (settings.api_key) headers.Authorization = `Bearer ${settings.api_key}`;
  return headers;
}

async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    // clipboard API refused (permissions, insecure origin): fall back to a hidden selection
    const area = document.createElement("textarea");
    area.value = text;
    area.className = "offscreen";
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
}

function button(label, className, title, onClick) {
  const node = document.createElement("button");
  node.type = "button";
  node.className = className;
  node.textContent = label;
  node.title = title;
  node.addEventListener("click", onClick);
  return node;
}

// ---------------------------------------------------------------------------------------------------------
// Persistence and the side list

function persist(conversation) {
  conversation.updated = Date.now();
  conversation.title = store.titleFor(conversation);
  if (!conversations.includes(conversation)) conversations.unshift(conversation);
  store.saveConversations(conversations);
  store.saveCurrentId(conversation.id);
  renderHistory();
}

function renderHistory() {
  ui.history.replaceChildren();
  const sorted = [...conversations].sort((a, b) => b.updated - a.updated);
  for (const conversation of sorted) {
    const item = document.createElement("li");
    item.dataset.id = conversation.id;
    if (conversation === current) item.classList.add("current");
    const open = button(conversation.title, "open", conversation.title, () => openConversation(conversation));
    if (conversation.mode === "raw") open.prepend(Object.assign(document.createElement("span"), {
      className: "badge", textContent: "raw",
    }));
    const remove = button("✕", "icon delete", "Delete this conversation", () => deleteConversation(conversation));
    item.append(open, remove);
    ui.history.append(item);
  }
}

function openConversation(conversation) {
  if (active) stopGeneration();
  current = conversation;
  showMode();
  store.saveCurrentId(conversation.id);
  closeSidebar();
  hideError();
  renderHistory();
  renderMessages();
}

function deleteConversation(conversation) {
  if (active && active.conversation === conversation) stopGeneration();
  conversations = conversations.filter((c) => c !== conversation);
  store.saveConversations(conversations);
  if (conversation === current) openConversation(store.newConversation(ui.mode.value));
  else renderHistory();
}

function newChat() {
  openConversation(store.newConversation(ui.mode.value));
  ui.input.focus();
}

// ---------------------------------------------------------------------------------------------------------
// Messages

function addCodeCopyButtons(root) {
  for (const pre of root.querySelectorAll("pre.code-block")) {
    const copy = button("Copy", "copy-code", "Copy this code", async () => {
      await copyText(pre.querySelector("code").textContent);
      copy.textContent = "Copied";
      setTimeout(() => { copy.textContent = "Copy"; }, 1500);
    });
    pre.prepend(copy);
  }
}

function renderContent(target, message, conversation) {
  target.replaceChildren();
  if (message.role === "assistant" && conversation.mode === "chat") {
    target.append(renderMarkdown(message.content));
    addCodeCopyButtons(target);
  } else {
    target.textContent = message.content;
  }
  if (message.role === "assistant" && !message.content && !message.error && !message.stopped) {
    target.append(Object.assign(document.createElement("span"), { className: "typing", textContent: "…" }));
  }
}

function statsText(message) {
  const parts = [];
  if (message.stats) {
    const { tokens, seconds, ttft } = message.stats;
    if (tokens !== undefined) parts.push(`${tokens} tokens`);
    if (tokens && seconds > 0) parts.push(`${(tokens / seconds).toFixed(1)} tok/s`);
    if (ttft !== undefined) parts.push(`first token ${Math.round(ttft * 1000)} ms`);
  }
  if (message.stopped) parts.push("stopped");
  if (message.finish_reason === "length") parts.push(message.context_full ? "context full" : "hit max tokens");
  return parts.join(" · ");
}

// What the model did not see of the conversation (context.js), shown above its reply.
function noticeNode(text) {
  return Object.assign(document.createElement("div"), { className: "notice", textContent: text });
}

function messageNode(message, index, conversation) {
  const node = document.createElement("article");
  node.className = `message ${message.role}${conversation.mode === "raw" ? " raw" : ""}`;
  node.dataset.index = String(index);
  const role = document.createElement("div");
  role.className = "role";
  role.textContent = message.role === "user" ? (conversation.mode === "raw" ? "Prompt" : "You") : modelName;
  const content = document.createElement("div");
  content.className = "content";
  renderContent(content, message, conversation);
  node.append(role);
  if (message.notice) node.append(noticeNode(message.notice));
  node.append(content);
  if (message.error) {
    const error = document.createElement("div");
    error.className = "error-text";
    error.textContent = message.error;
    node.append(error);
  }
  const meta = document.createElement("div");
  meta.className = "meta";
  meta.textContent = statsText(message);
  node.append(meta);

  const actions = document.createElement("div");
  actions.className = "actions";
  const copy = button("Copy", "copy", "Copy this message", async () => {
    await copyText(message.content);
    copy.textContent = "Copied";
    setTimeout(() => { copy.textContent = "Copy"; }, 1500);
  });
  actions.append(copy);
  const isLast = index === conversation.messages.length - 1;
  if (message.role === "user") {
    actions.append(button("Edit", "edit", "Edit and resend (later turns are replaced)",
                          () => startEdit(node, index)));
  } else if (isLast) {
    actions.append(button("Regenerate", "regenerate", "Generate this reply again", regenerate));
  }
  node.append(actions);
  return node;
}

function renderMessages() {
  ui.messages.replaceChildren(ui.empty);
  ui.empty.hidden = current.messages.length > 0;
  current.messages.forEach((message, index) => ui.messages.append(messageNode(message, index, current)));
  setBusy(Boolean(active));
  scrollToEnd(true);
}

function nearBottom() {
  const box = ui.messages;
  return box.scrollHeight - box.scrollTop - box.clientHeight < 80;
}

function scrollToEnd(force) {
  if (force || nearBottom()) ui.messages.scrollTop = ui.messages.scrollHeight;
}

function startEdit(node, index) {
  if (active) return;
  const message = current.messages[index];
  const content = node.querySelector(".content");
  const editor = document.createElement("textarea");
  editor.className = "editor";
  editor.value = message.content;
  editor.rows = Math.min(12, message.content.split("\n").length + 1);
  const save = button("Save & send", "primary save-edit", "Replace this message and regenerate from here", () => {
    const text = editor.value.trim();
    if (!text) return;
    current.messages = current.messages.slice(0, index);
    current.messages.push({ role: "user", content: text });
    generate(current);
  });
  const cancel = button("Cancel", "cancel-edit", "Keep the message as it was", renderMessages);
  const bar = document.createElement("div");
  bar.className = "edit-actions";
  bar.append(cancel, save);
  content.replaceChildren(editor, bar);
  node.querySelector(".actions").hidden = true;
  editor.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      save.click();
    } else if (event.key === "Escape") {
      renderMessages();
    }
  });
  editor.focus();
}

// ---------------------------------------------------------------------------------------------------------
// Generation

async function countTokens(body, signal) {
  const response = await fetch("/v1/tokenize", {
    method: "POST", headers: authHeaders(), body: JSON.stringify(body), signal,
  });
  if (!response.ok) throw new Error(await describeError(response));
  const { count, max_seq_len: context } = await response.json();
  return { count, context };
}

// The request for the reply being generated, fitted to the model's context (see context.js).
async function requestFor(conversation, signal) {
  const history = conversation.messages.slice(0, -1);  // the last entry is the reply being generated
  const count = (body) => countTokens(body, signal);
  const wanted = Number(settings.max_tokens);
  const common = {
    stream: true,
    stream_options: { include_usage: true },
    temperature: Number(settings.temperature),
    top_k: Number(settings.top_k),
  };
  if (conversation.mode === "raw") {
    const fit = await fitPrompt(history[history.length - 1].content, wanted, count);
    return { url: "/v1/completions", fit, body: { ...common, prompt: fit.prompt, max_tokens: fit.maxTokens } };
  }
  const turns = history.map((m) => ({ role: m.role, content: m.content }));
  const system = settings.system_prompt.trim() ? settings.system_prompt : "";
  const fit = await fitChat(turns, system, wanted, count);
  return { url: "/v1/chat/completions", fit, body: { ...common, messages: fit.messages, max_tokens: fit.maxTokens } };
}

function setBusy(busy) {
  ui.send.hidden = busy;
  ui.stop.hidden = !busy;
  for (const node of ui.messages.querySelectorAll(".edit, .regenerate")) node.disabled = busy;
}

async function generate(conversation) {
  hideError();
  const reply = { role: "assistant", content: "" };
  conversation.messages.push(reply);
  persist(conversation);
  renderMessages();
  const controller = new AbortController();
  active = { controller, conversation };
  setBusy(true);
  const replyNode = () => (current === conversation ? ui.messages.lastElementChild : null);
  let pendingFrame = 0;
  const repaint = () => {
    pendingFrame = 0;
    const node = replyNode();
    if (node) {
      renderContent(node.querySelector(".content"), reply, conversation);
      scrollToEnd(false);
    }
  };
  const started = performance.now();
  let firstToken = null;
  let usage = null;
  try {
    const { url, body, fit } = await requestFor(conversation, controller.signal);
    if (fit.capped) reply.context_full = true;
    if (fit.notice) {
      reply.notice = fit.notice;
      const node = replyNode();
      if (node) node.querySelector(".content").before(noticeNode(reply.notice));
    }
    const response = await fetch(url, {
      method: "POST", headers: authHeaders(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!response.ok) throw new Error(await describeError(response));
    await readEvents(response, (data) => {
      if (data === "[DONE]") return;
      const event = JSON.parse(data);
      if (event.error) throw new Error(`Error: ${event.error.message}`);
      if (event.usage) usage = event.usage;
      for (const choice of event.choices || []) {
        const piece = conversation.mode === "raw" ? choice.text : choice.delta && choice.delta.content;
        if (piece) {
          reply.content += piece;
          if (firstToken === null) firstToken = performance.now();
          if (!pendingFrame) pendingFrame = requestAnimationFrame(repaint);
        }
        if (choice.finish_reason) reply.finish_reason = choice.finish_reason;
      }
    });
  } catch (err) {
    if (err.name === "AbortError") reply.stopped = true;
    else if (err instanceof TypeError) reply.error = `Could not reach the server (${err.message}); is it running?`;
    else reply.error = err.message || String(err);
    if (reply.error) showError(reply.error);
  } finally {
    if (pendingFrame) cancelAnimationFrame(pendingFrame);
    const seconds = (performance.now() - (firstToken ?? started)) / 1000;
    reply.stats = {
      tokens: usage ? usage.completion_tokens : undefined,
      seconds,
      ttft: firstToken === null ? undefined : (firstToken - started) / 1000,
    };
    active = null;
    persist(conversation);
    if (current === conversation) renderMessages();
    else setBusy(false);
  }
}

function stopGeneration() {
  if (active) active.controller.abort();
}

function sendFromComposer() {
  const text = ui.input.value.trim();
  if (!text || active) return;
  ui.input.value = "";
  autoGrow();
  current.mode = ui.mode.value;
  current.messages.push({ role: "user", content: text });
  generate(current);
}

function regenerate() {
  if (active) return;
  const last = current.messages[current.messages.length - 1];
  if (!last || last.role !== "assistant") return;
  current.messages.pop();
  generate(current);
}

// ---------------------------------------------------------------------------------------------------------
// Settings, model name, layout

function openSettings() {
  const form = ui.settingsForm;
  form.temperature.value = settings.temperature;
  form.top_k.value = settings.top_k;
  form.max_tokens.value = settings.max_tokens;
  form.system_prompt.value = settings.system_prompt;
  form.api_key.value = settings.api_key;
  ui.settings.showModal();
}

function saveSettingsFromForm(event) {
  const form = ui.settingsForm;
  if (!form.reportValidity()) {
    event.preventDefault();
    return;
  }
  settings = {
    temperature: Number(form.temperature.value),
    top_k: Number(form.top_k.value),
    max_tokens: Number(form.max_tokens.value),
    system_prompt: form.system_prompt.value,
    api_key: form.api_key.value.trim(),
  };
  store.saveSettings(settings);
  loadModelName();
}

async function loadModelName() {
  try {
    const response = await fetch("/v1/models", { headers: authHeaders() });
    if (response.status === 503) {
      ui.model.textContent = "loading model…";
      setTimeout(loadModelName, 2000);
      return;
    }
    if (!response.ok) {
      ui.model.textContent = response.status === 401 ? "API key needed (⚙)" : `error ${response.status}`;
      return;
    }
    const card = (await response.json()).data[0];
    modelName = card.id;
    ui.model.textContent = card.id;
    ui.model.title = `source ${card.source ?? "?"} · tag ${card.tag ?? "?"} · step ${card.step ?? "?"} · ` +
      `context ${card.max_seq_len} tokens`;
    // relabel in place: re-rendering would replace message nodes under the user (an open editor, a selection)
    for (const role of ui.messages.querySelectorAll(".message.assistant .role")) role.textContent = modelName;
  } catch {
    ui.model.textContent = "server unreachable";
    setTimeout(loadModelName, 5000);
  }
}

function autoGrow() {
  ui.input.style.height = "auto";
  ui.input.style.height = `${Math.min(ui.input.scrollHeight, 240)}px`;
}

function closeSidebar() {
  document.body.classList.remove("sidebar-open");
  ui.scrim.hidden = true;
}

function toggleSidebar() {
  const open = !document.body.classList.contains("sidebar-open");
  document.body.classList.toggle("sidebar-open", open);
  ui.scrim.hidden = !open;
}

function showMode() {
  ui.mode.value = current.mode;
  ui.input.placeholder = current.mode === "raw" ? "Text for the model to continue" : "Message nanochat";
}

function onModeChange() {
  // a conversation keeps its mode: switching with messages on screen starts a new one
  if (current.messages.length) openConversation(store.newConversation(ui.mode.value));
  else current.mode = ui.mode.value;
  showMode();
}

ui.composer.addEventListener("submit", (event) => {
  event.preventDefault();
  sendFromComposer();
});
ui.input.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    sendFromComposer();
  }
});
ui.input.addEventListener("input", autoGrow);
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && active) stopGeneration();
});
ui.stop.addEventListener("click", stopGeneration);
$("#new-chat").addEventListener("click", newChat);
$("#toggle-sidebar").addEventListener("click", toggleSidebar);
ui.scrim.addEventListener("click", closeSidebar);
ui.banner.querySelector(".dismiss").addEventListener("click", hideError);
$("#open-settings").addEventListener("click", openSettings);
$("#settings-cancel").addEventListener("click", () => ui.settings.close());
ui.settingsForm.addEventListener("submit", saveSettingsFromForm);
ui.mode.addEventListener("change", onModeChange);
ui.theme.addEventListener("click", () => {
  theme = { auto: "light", light: "dark", dark: "auto" }[theme] || "auto";
  store.saveTheme(theme);
  applyTheme();
});
systemDark.addEventListener("change", applyTheme);

applyTheme();
showMode();
renderHistory();
renderMessages();
loadModelName();
ui.input.focus();
