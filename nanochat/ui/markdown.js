// A small markdown renderer that only ever builds DOM nodes: every piece of model text ends up in a text
// node (or an attribute we set ourselves), never in innerHTML, so a reply cannot inject markup or script.
// Supported: fenced code blocks (an unclosed fence while streaming counts as code), headings, bullet and
// numbered lists, block quotes, rules, paragraphs; inline code, bold, italic, strikethrough, http(s) links.

const FENCE = /^\s*(```|~~~)\s*([\w+#.-]*)\s*$/;
const HEADING = /^(#{1,6})\s+(.*)$/;
const BULLET = /^\s*[-*+]\s+(.*)$/;
const NUMBERED = /^\s*(\d{1,9})[.)]\s+(.*)$/;
const QUOTE = /^\s*>\s?(.*)$/;
const RULE = /^\s*([-*_])(\s*\1){2,}\s*$/;

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// Inline spans, earliest match first; the content of emphasis is rendered recursively. Underscore emphasis
// never opens or closes inside a word, so snake_case and window.__name stay as typed.
const INLINE = [
  { re: /`([^`\n]+)`/, make: (m) => el("code", null, m[1]) },
  { re: /\*\*(?=\S)([\s\S]*?\S)\*\*/, make: (m) => wrap("strong", m[1]) },
  { re: /(^|[^\w])__(?=\S)([\s\S]*?\S)__(?!\w)/, make: (m) => wrap("strong", m[2]), lead: 1 },
  { re: /~~(?=\S)([\s\S]*?\S)~~/, make: (m) => wrap("del", m[1]) },
  { re: /\*(?=[^\s*])([^*]*?[^\s*])\*/, make: (m) => wrap("em", m[1]) },
  { re: /(^|[^\w])_(?=[^\s_])([^_]*?[^\s_])_(?!\w)/, make: (m) => wrap("em", m[2]), lead: 1 },
  { re: /\[([^\]\n]+)\]\((https?:\/\/[^\s)]+)\)/, make: (m) => link(m[1], m[2]) },
];

function wrap(tag, text) {
  const node = el(tag);
  node.append(renderInline(text));
  return node;
}

function link(text, href) {
  const a = el("a", null, text);
  a.href = href;  // the pattern only admits http(s) URLs, so no javascript: links
  a.target = "_blank";
  a.rel = "noopener noreferrer";
  return a;
}

export function renderInline(text) {
  const fragment = document.createDocumentFragment();
  let rest = text;
  while (rest) {
    let best = null;
    for (const rule of INLINE) {
      const m = rule.re.exec(rest);
      if (!m) continue;
      const start = m.index + (rule.lead ? m[rule.lead].length : 0);
      if (!best || start < best.start) best = { rule, m, start };
    }
    if (!best) {
      fragment.append(document.createTextNode(rest));
      break;
    }
    if (best.start > 0) fragment.append(document.createTextNode(rest.slice(0, best.start)));
    fragment.append(best.rule.make(best.m));
    rest = rest.slice(best.m.index + best.m[0].length);
  }
  return fragment;
}

function isClosingFence(line, opener) {
  const m = FENCE.exec(line);
  return m !== null && m[1] === opener && m[2] === "";
}

function appendLines(parent, lines) {
  lines.forEach((line, i) => {
    if (i) parent.append(el("br"));
    parent.append(renderInline(line));
  });
}

function codeBlock(lang, lines) {
  const pre = el("pre", "code-block");
  if (lang) pre.dataset.lang = lang;
  const code = el("code", null, lines.join("\n"));
  pre.append(code);
  return pre;
}

function list(lines, pattern, ordered) {
  const node = el(ordered ? "ol" : "ul");
  if (ordered) {
    const first = Number(pattern.exec(lines[0])[1]);
    if (first !== 1) node.start = first;
  }
  let item = null;
  for (const line of lines) {
    const m = pattern.exec(line);
    if (m) {
      item = el("li");
      item.append(renderInline(ordered ? m[2] : m[1]));
      node.append(item);
    } else {
      item.append(el("br"), renderInline(line.trim()));
    }
  }
  return node;
}

export function renderMarkdown(text) {
  const root = document.createDocumentFragment();
  const lines = text.replace(/\r\n?/g, "\n").split("\n");
  let i = 0;
  const isBlockStart = (line) =>
    FENCE.test(line) || HEADING.test(line) || BULLET.test(line) || NUMBERED.test(line) || QUOTE.test(line) ||
    RULE.test(line);

  while (i < lines.length) {
    const line = lines[i];
    let m;
    if (line.trim() === "") {
      i++;
    } else if ((m = FENCE.exec(line))) {
      const body = [];
      i++;
      while (i < lines.length && !isClosingFence(lines[i], m[1])) body.push(lines[i++]);
      i++;  // the closing fence (or past the end while a reply is still streaming)
      root.append(codeBlock(m[2], body));
    } else if (RULE.test(line)) {
      root.append(el("hr"));
      i++;
    } else if ((m = HEADING.exec(line))) {
      const heading = el(`h${Math.min(6, m[1].length + 2)}`);
      heading.append(renderInline(m[2]));
      root.append(heading);
      i++;
    } else if (QUOTE.test(line)) {
      const body = [];
      while (i < lines.length && (m = QUOTE.exec(lines[i]))) {
        body.push(m[1]);
        i++;
      }
      const quote = el("blockquote");
      quote.append(renderMarkdown(body.join("\n")));
      root.append(quote);
    } else if (BULLET.test(line) || NUMBERED.test(line)) {
      const pattern = BULLET.test(line) ? BULLET : NUMBERED;
      const body = [];
      while (i < lines.length && lines[i].trim() !== "" &&
             (pattern.test(lines[i]) || (!isBlockStart(lines[i]) && /^\s+/.test(lines[i])))) {
        body.push(lines[i++]);
      }
      root.append(list(body, pattern, pattern === NUMBERED));
    } else {
      const body = [];
      while (i < lines.length && lines[i].trim() !== "" && (body.length === 0 || !isBlockStart(lines[i]))) {
        body.push(lines[i++]);
      }
      const paragraph = el("p");
      appendLines(paragraph, body);
      root.append(paragraph);
    }
  }
  return root;
}
