// Markdown for model answers: a small, safe subset written here on purpose.
//
// Why not a library: the maintained renderers (markdown-it, marked, micromark) ship for the
// browser only through npm and a bundler or a copy of their code in this repository, and the
// page must need no build step and carry no copied code. They also produce HTML strings, which
// then need a sanitizer (DOMPurify: the same problem again). This renderer never produces HTML:
// it builds DOM nodes and puts every piece of model text in with textContent, so nothing a
// model writes can become an element, an attribute or a script. Links keep only http(s) URLs.
//
// The subset: fenced code blocks (``` with a language), headings, block quotes, flat lists,
// rules, paragraphs; inline code, **bold**, *italic*, [links](https://...). Inline patterns
// have bounded lengths, so a hostile line of any size is parsed in linear time.

const FENCE = /^\s*(```|~~~)\s*([\w+#.-]*)\s*$/;
const HEADING = /^(#{1,6})\s+(.*)$/;
const QUOTE = /^>\s?(.*)$/;
const BULLET = /^\s*[-*+]\s+(.*)$/;
const NUMBERED = /^\s*\d{1,9}[.)]\s+(.*)$/;
const RULE = /^\s*([-*_])(\s*\1){2,}\s*$/;
const GROUPS = [
  [BULLET, "ul"],
  [NUMBERED, "ol"],
  [QUOTE, "blockquote"],
];
const INLINE =
  /`([^`\n]{1,2000})`|\*\*([^*\n]{1,2000})\*\*|\*([^*\n]{1,2000})\*|\[([^\]\n]{1,500})\]\(([^()\s]{1,2000})\)/g;

function element(tag, text) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  return node;
}

export function safeUrl(url) {
  if (!/^https?:\/\//i.test(url)) return null;
  try {
    const parsed = new URL(url);
    return parsed.protocol === "http:" || parsed.protocol === "https:" ? parsed.href : null;
  } catch {
    return null;
  }
}

export function inline(parent, text) {
  let last = 0;
  INLINE.lastIndex = 0;
  for (let match = INLINE.exec(text); match; match = INLINE.exec(text)) {
    if (match.index > last) parent.append(text.slice(last, match.index));
    const [whole, code, bold, italic, label, url] = match;
    if (code !== undefined) parent.append(element("code", code));
    else if (bold !== undefined) parent.append(element("strong", bold));
    else if (italic !== undefined) parent.append(element("em", italic));
    else {
      const href = safeUrl(url);
      if (href) {
        const link = element("a", label);
        link.href = href;
        link.rel = "noopener noreferrer";
        link.target = "_blank";
        parent.append(link);
      } else {
        parent.append(whole);
      }
    }
    last = match.index + whole.length;
  }
  if (last < text.length) parent.append(text.slice(last));
}

function codeBlock(language, lines) {
  const pre = element("pre");
  const code = element("code", lines.join("\n"));
  if (language) code.dataset.language = language;
  pre.append(code);
  return pre;
}

function list(tag, items) {
  const node = element(tag);
  for (const item of items) inline(node.appendChild(element("li")), item);
  return node;
}

// Markdown text -> a DocumentFragment of safe nodes. An unclosed fence (an answer still
// streaming) runs to the end.
export function render(text) {
  const out = document.createDocumentFragment();
  const lines = text.split("\n");
  let paragraph = [];
  const flush = () => {
    if (paragraph.length) inline(out.appendChild(element("p")), paragraph.join("\n"));
    paragraph = [];
  };
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    const fence = FENCE.exec(line);
    if (fence) {
      flush();
      const body = [];
      for (i++; i < lines.length && !lines[i].trim().startsWith(fence[1]); i++) body.push(lines[i]);
      out.append(codeBlock(fence[2], body));
      continue;
    }
    const heading = HEADING.exec(line);
    if (heading) {
      flush();
      inline(out.appendChild(element(`h${Math.min(heading[1].length + 2, 6)}`)), heading[2]);
      continue;
    }
    if (RULE.test(line)) {
      flush();
      out.append(element("hr"));
      continue;
    }
    const group = GROUPS.find(([pattern]) => pattern.test(line));
    if (group) {
      const [pattern, tag] = group;
      flush();
      const items = [];
      for (; i < lines.length && pattern.test(lines[i]); i++) items.push(pattern.exec(lines[i])[1]);
      i--;
      if (tag === "blockquote") inline(out.appendChild(element(tag)), items.join("\n"));
      else out.append(list(tag, items));
      continue;
    }
    if (line.trim()) paragraph.push(line);
    else flush();
  }
  flush();
  return out;
}
