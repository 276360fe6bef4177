// Markdown to DOM for chat replies, without an HTML parser in the loop: every piece of text becomes
// a text node, links keep only http(s)/mailto targets, and images are never loaded (shown as links).
// Raw HTML in the source therefore shows up as literal text. A reply still streaming may end inside
// a code fence; the open fence simply runs to the end.

import { highlightInto } from "./highlight.js";

const FENCE_OPEN = /^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)[^`]*$/;
const HEADING = /^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$/;
const RULE = /^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$/;
const QUOTE = /^ {0,3}> ?(.*)$/;
const LIST_ITEM = /^( *)([-*+]|\d{1,9}[.)])[ \t]+(.*)$/;
const TABLE_DIVIDER = /^ *\|? *:?-{1,}:? *(\| *:?-{1,}:? *)*\|? *$/;

function startsBlock(line, nextLine) {
  return (
    FENCE_OPEN.test(line) ||
    HEADING.test(line) ||
    RULE.test(line) ||
    QUOTE.test(line) ||
    LIST_ITEM.test(line) ||
    isTableStart(line, nextLine)
  );
}

function isTableStart(line, nextLine) {
  return line.includes("|") && nextLine !== undefined && TABLE_DIVIDER.test(nextLine) && nextLine.includes("-");
}

function splitTableRow(line) {
  let row = line.trim();
  if (row.startsWith("|")) row = row.slice(1);
  if (row.endsWith("|") && !row.endsWith("\\|")) row = row.slice(0, -1);
  return row.split(/(?<!\\)\|/).map((cell) => cell.trim().replace(/\\\|/g, "|"));
}

async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    await navigator.clipboard.writeText(text);
    return;
  }
  // Plain http on a LAN is not a secure context, so the Clipboard API is missing there.
  const area = document.createElement("textarea");
  area.value = text;
  area.setAttribute("readonly", "");
  area.className = "visually-hidden";
  document.body.append(area);
  area.select();
  const copied = document.execCommand("copy");
  area.remove();
  if (!copied) throw new Error("copy refused by the browser");
}

function codeBlock(code, language) {
  const wrapper = document.createElement("div");
  wrapper.className = "code-block";
  const header = document.createElement("div");
  header.className = "code-block__header";
  const label = document.createElement("span");
  label.className = "code-block__language";
  label.textContent = language || "text";
  const button = document.createElement("button");
  button.type = "button";
  button.className = "btn btn--small code-block__copy";
  button.textContent = "Copy";
  button.setAttribute("aria-label", `Copy ${language || "text"} code`);
  button.addEventListener("click", async () => {
    try {
      await copyText(code);
      button.textContent = "Copied";
    } catch {
      button.textContent = "Copy failed";
    }
    setTimeout(() => {
      button.textContent = "Copy";
    }, 1500);
  });
  header.append(label, button);
  const pre = document.createElement("pre");
  const codeElement = document.createElement("code");
  if (language) codeElement.dataset.language = language;
  highlightInto(codeElement, code, language);
  pre.append(codeElement);
  wrapper.append(header, pre);
  return wrapper;
}

export function safeLinkTarget(url) {
  try {
    const parsed = new URL(url, window.location.href);
    return ["http:", "https:", "mailto:"].includes(parsed.protocol) ? parsed.href : null;
  } catch {
    return null;
  }
}

function link(href, children, title) {
  const target = safeLinkTarget(href);
  if (!target) return null;
  const anchor = document.createElement("a");
  anchor.href = target;
  anchor.target = "_blank";
  anchor.rel = "noopener noreferrer nofollow";
  if (title) anchor.title = title;
  anchor.append(...children);
  return anchor;
}

const INLINE_PATTERNS = [
  { name: "code", regex: /(`+)([\s\S]*?[^`])\1(?!`)/y },
  { name: "escape", regex: /\\([!-/:-@[-`{-~])/y },
  { name: "image", regex: /!\[([^\]\n]*)\]\(\s*<?([^\s)>]+)>?(?:\s+"([^"]*)")?\s*\)/y },
  { name: "link", regex: /\[((?:[^[\]\n]|\[[^\]\n]*\])+)\]\(\s*<?([^\s)>]+)>?(?:\s+"([^"]*)")?\s*\)/y },
  { name: "strong", regex: /(\*\*|__)(?=\S)([\s\S]*?\S)\1/y },
  { name: "em", regex: /([*_])(?=[^\s*_])([\s\S]*?[^\s\\])\1(?![*_])/y },
  { name: "del", regex: /~~(?=\S)([\s\S]*?\S)~~/y },
  { name: "url", regex: /https?:\/\/[^\s<>"'`]+/y },
];
const INLINE_TRIGGER = /[`\\![*_~h\n]/;

/** Appends inline markdown (code, emphasis, links, line breaks) to parent as DOM nodes. */
export function renderInline(text, parent, { inLink = false } = {}) {
  let plain = "";
  const flush = () => {
    if (plain) parent.append(document.createTextNode(plain));
    plain = "";
  };
  let index = 0;
  while (index < text.length) {
    const char = text[index];
    if (!INLINE_TRIGGER.test(char)) {
      plain += char;
      index += 1;
      continue;
    }
    if (char === "\n") {
      flush();
      parent.append(document.createElement("br"));
      index += 1;
      continue;
    }
    const previous = index > 0 ? text[index - 1] : " ";
    let matched = false;
    for (const { name, regex } of INLINE_PATTERNS) {
      if (name === "url" && (char !== "h" || inLink || /\w/.test(previous))) continue;
      // Underscores inside words (snake_case, __dunder__) are not emphasis.
      if ((name === "em" || name === "strong") && char === "_" && /\w/.test(previous)) continue;
      if ((name === "link" || name === "image") && inLink) continue;
      regex.lastIndex = index;
      const found = regex.exec(text);
      if (!found) continue;
      if ((name === "em" || name === "strong") && found[1][0] === "_" && /\w/.test(text[regex.lastIndex] ?? "")) continue;
      let consumed = found[0].length;
      let node = null;
      if (name === "code") {
        node = document.createElement("code");
        const body = found[2];
        node.textContent = /^ .* $/.test(body) ? body.slice(1, -1) : body;
      } else if (name === "escape") {
        plain += found[1];
        index += consumed;
        matched = true;
        break;
      } else if (name === "image") {
        const label = document.createTextNode(`[image: ${found[1] || found[2]}]`);
        node = link(found[2], [label], found[3]) ?? label;
      } else if (name === "link") {
        const children = document.createDocumentFragment();
        renderInline(found[1], children, { inLink: true });
        node = link(found[2], [children], found[3]);
        if (!node) {
          node = document.createDocumentFragment();
          renderInline(found[1], node, { inLink: true });
          node.append(document.createTextNode(` (${found[2]})`));
        }
      } else if (name === "strong" || name === "em" || name === "del") {
        node = document.createElement(name);
        renderInline(name === "del" ? found[1] : found[2], node, { inLink });
      } else if (name === "url") {
        const url = found[0].replace(/[.,:;!?)\]]+$/, "");
        consumed = url.length;
        node = link(url, [document.createTextNode(url)]);
        if (!node) continue;
      }
      flush();
      parent.append(node);
      index += consumed;
      matched = true;
      break;
    }
    if (!matched) {
      plain += char;
      index += 1;
    }
  }
  flush();
  return parent;
}

function paragraph(text) {
  const element = document.createElement("p");
  renderInline(text, element);
  return element;
}

function parseList(lines, start) {
  const first = LIST_ITEM.exec(lines[start]);
  const baseIndent = first[1].length;
  const ordered = /\d/.test(first[2]);
  const list = document.createElement(ordered ? "ol" : "ul");
  if (ordered && Number.parseInt(first[2], 10) !== 1) list.start = Number.parseInt(first[2], 10);
  let index = start;
  let loose = false;
  const items = [];
  while (index < lines.length) {
    const marker = LIST_ITEM.exec(lines[index]);
    if (!marker || marker[1].length !== baseIndent || /\d/.test(marker[2]) !== ordered) break;
    const contentIndent = marker[1].length + marker[2].length + 1;
    const itemLines = [marker[3]];
    index += 1;
    while (index < lines.length) {
      const line = lines[index];
      if (line.trim() === "") {
        const next = lines[index + 1];
        const nextIndent = next === undefined ? 0 : next.length - next.trimStart().length;
        if (next !== undefined && next.trim() !== "" && nextIndent > baseIndent) {
          loose = loose || !LIST_ITEM.test(next);
          itemLines.push("");
          index += 1;
          continue;
        }
        break;
      }
      const indent = line.length - line.trimStart().length;
      if (indent <= baseIndent && (LIST_ITEM.test(line) || startsBlock(line, lines[index + 1]))) break;
      itemLines.push(indent >= contentIndent ? line.slice(contentIndent) : line.trimStart());
      index += 1;
    }
    items.push(itemLines);
    // A blank line between items makes the list loose: keep looking for the next item.
    if (lines[index] !== undefined && lines[index].trim() === "") {
      const next = lines[index + 1];
      const nextMarker = next === undefined ? null : LIST_ITEM.exec(next);
      if (nextMarker && nextMarker[1].length === baseIndent && /\d/.test(nextMarker[2]) === ordered) {
        loose = true;
        index += 1;
      }
    }
  }
  for (const itemLines of items) {
    const item = document.createElement("li");
    const content = renderBlocks(itemLines);
    if (!loose && content.childNodes.length >= 1 && content.firstChild.nodeName === "P") {
      // Tight list: the first paragraph's inline content sits directly in the <li>.
      const firstParagraph = content.firstChild;
      content.removeChild(firstParagraph);
      item.append(...firstParagraph.childNodes);
    }
    item.append(content);
    list.append(item);
  }
  return { element: list, next: index };
}

function renderBlocks(lines) {
  const fragment = document.createDocumentFragment();
  let index = 0;
  while (index < lines.length) {
    const line = lines[index];
    if (line.trim() === "") {
      index += 1;
      continue;
    }
    const fence = FENCE_OPEN.exec(line);
    if (fence) {
      const marker = fence[1];
      const indent = line.length - line.trimStart().length;
      const body = [];
      index += 1;
      while (index < lines.length) {
        const closing = lines[index].trim();
        if (closing.startsWith(marker[0].repeat(marker.length)) && /^([`~])\1*$/.test(closing)) break;
        body.push(indent ? lines[index].replace(new RegExp(`^ {0,${indent}}`), "") : lines[index]);
        index += 1;
      }
      index += 1;
      fragment.append(codeBlock(body.join("\n"), fence[2].toLowerCase()));
      continue;
    }
    const heading = HEADING.exec(line);
    if (heading) {
      const element = document.createElement(`h${heading[1].length}`);
      renderInline(heading[2] ?? "", element);
      fragment.append(element);
      index += 1;
      continue;
    }
    if (RULE.test(line)) {
      fragment.append(document.createElement("hr"));
      index += 1;
      continue;
    }
    if (QUOTE.test(line)) {
      const quoted = [];
      while (index < lines.length && lines[index].trim() !== "") {
        const match = QUOTE.exec(lines[index]);
        quoted.push(match ? match[1] : lines[index]);
        index += 1;
      }
      const element = document.createElement("blockquote");
      element.append(renderBlocks(quoted));
      fragment.append(element);
      continue;
    }
    if (LIST_ITEM.test(line)) {
      const { element, next } = parseList(lines, index);
      fragment.append(element);
      index = next;
      continue;
    }
    if (isTableStart(line, lines[index + 1])) {
      const header = splitTableRow(line);
      const alignments = splitTableRow(lines[index + 1]).map((cell) => {
        if (cell.startsWith(":") && cell.endsWith(":")) return "center";
        if (cell.endsWith(":")) return "right";
        return cell.startsWith(":") ? "left" : "";
      });
      index += 2;
      const table = document.createElement("table");
      const head = table.createTHead().insertRow();
      header.forEach((cell, column) => {
        const th = document.createElement("th");
        th.scope = "col";
        if (alignments[column]) th.dataset.align = alignments[column];
        renderInline(cell, th);
        head.append(th);
      });
      const body = table.createTBody();
      while (index < lines.length && lines[index].includes("|") && lines[index].trim() !== "") {
        const row = body.insertRow();
        splitTableRow(lines[index]).forEach((cell, column) => {
          if (column >= header.length) return;
          const td = row.insertCell();
          if (alignments[column]) td.dataset.align = alignments[column];
          renderInline(cell, td);
        });
        index += 1;
      }
      const scroller = document.createElement("div");
      scroller.className = "table-scroll";
      scroller.append(table);
      fragment.append(scroller);
      continue;
    }
    const paragraphLines = [line];
    index += 1;
    while (index < lines.length && lines[index].trim() !== "" && !startsBlock(lines[index], lines[index + 1])) {
      paragraphLines.push(lines[index]);
      index += 1;
    }
    fragment.append(paragraph(paragraphLines.map((text) => text.trim()).join("\n")));
  }
  return fragment;
}

/** Markdown text to a DocumentFragment made only of safe elements and text nodes. */
export function renderMarkdown(text) {
  return renderBlocks(String(text ?? "").replace(/\r\n?/g, "\n").replace(/\t/g, "    ").split("\n"));
}
