// What the page keeps in localStorage: conversations (the side list), the open one, settings and theme.
// A conversation is {id, title, mode: "chat"|"raw", messages: [{role, content, error?, stats?}], updated}.

const KEYS = {
  conversations: "nanochat.conversations",
  current: "nanochat.current",
  settings: "nanochat.settings",
  theme: "nanochat.theme",
};

export const DEFAULT_SETTINGS = {
  temperature: 0.8,
  top_k: 50,
  max_tokens: 512,
  system_prompt: "",
  api_key: "",
};

function read(key, fallback) {
  try {
    const raw = localStorage.getItem(key);
    return raw === null ? fallback : JSON.parse(raw);
  } catch {
    return fallback;  // unreadable or corrupt storage must not break the page
  }
}

function write(key, value) {
  try {
    localStorage.setItem(key, JSON.stringify(value));
  } catch {
    // quota exceeded or storage disabled: the page keeps working for this session
  }
}

export function loadSettings() {
  return { ...DEFAULT_SETTINGS, ...read(KEYS.settings, {}) };
}

export function saveSettings(settings) {
  write(KEYS.settings, settings);
}

export function loadTheme() {
  return read(KEYS.theme, "auto");
}

export function saveTheme(theme) {
  write(KEYS.theme, theme);
}

export function loadConversations() {
  const list = read(KEYS.conversations, []);
  return Array.isArray(list) ? list.filter((c) => c && Array.isArray(c.messages)) : [];
}

export function saveConversations(conversations) {
  write(KEYS.conversations, conversations);
}

export function loadCurrentId() {
  return read(KEYS.current, null);
}

export function saveCurrentId(id) {
  write(KEYS.current, id);
}

export function newConversation(mode) {
  const id = `c${Date.now().toString(36)}${Math.random().toString(36).slice(2, 8)}`;
  return { id, title: "New chat", mode, messages: [], updated: Date.now() };
}

export function titleFor(conversation) {
  const first = conversation.messages.find((m) => m.role === "user");
  if (!first) return "New chat";
  const text = first.content.replace(/\s+/g, " ").trim();
  return text.length > 48 ? `${text.slice(0, 47)}…` : text || "New chat";
}
