// Markdown, code and math for chat replies, by maintained libraries (vendored from npm, see
// tools/vendor_static.py): markdown-it parses (CommonMark + tables, strikethrough, autolinks,
// footnotes and task lists), highlight.js colours code, KaTeX typesets $...$ and $$...$$ through
// markdown-it-texmath. Whatever HTML they produce goes through DOMPurify before it reaches the
// page, so a reply can never run script:
// - raw HTML in the source is shown as text (markdown-it's html option is off); a bare `<br>`
//   becomes a line break;
// - links keep only http(s) and mailto targets; images are never loaded (shown as links);
// - the only form control is a task list's checkbox, always disabled;
// - KaTeX runs untrusted (\href, \url, \htmlClass... render as red source text).
// While a reply streams, finished blocks are rendered once and kept; only the block still being
// written is parsed again, so the work per update does not grow with the reply and a selection
// in the text above survives.

import DOMPurify from "../vendor/dompurify/purify.es.js";
import katex from "../vendor/katex/katex.esm.js";
import markdownit from "../vendor/markdown-it/markdown-it.esm.min.js";
import footnote from "../vendor/markdown-it-footnote/markdown-it-footnote.esm.js";
import { tasklist } from "../vendor/mdit-plugin-tasklist/tasklist.esm.js";
import { highlightCode } from "./highlight.js";

const texmath = await loadClassicScript("../vendor/markdown-it-texmath/texmath.js", "texmath");

// markdown-it-texmath ships as a classic script that defines a global function.
function loadClassicScript(relativeUrl, globalName) {
  if (window[globalName]) return Promise.resolve(window[globalName]);
  return new Promise((resolve, reject) => {
    const script = document.createElement("script");
    script.src = new URL(relativeUrl, import.meta.url).href;
    script.onload = () => resolve(window[globalName]);
    script.onerror = () => reject(new Error(`could not load ${relativeUrl}`));
    document.head.append(script);
  });
}

const SAFE_LINK = /^(?:https?:|mailto:)/i;
const KATEX_OPTIONS = {
  throwOnError: false,
  trust: false,
  strict: "ignore",
  output: "htmlAndMathml",
  // A hostile reply cannot make a formula huge or expand macros for ever.
  maxSize: 50,
  maxExpand: 500,
};

function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (char) => `&#${char.charCodeAt(0)};`);
}

// GFM's "extended www autolink": `www.example.com/page` is a link without its scheme. linkify-it
// (markdown-it's linkifier) recognises scheme-less links only in its fuzzy mode, which also links
// bare names such as `setup.py` or `README.md` (.py and .md are country domains); so only the
// `www.` prefix is taught to it, with GFM's rule for where the link ends: trailing punctuation
// and a `)` without its `(` are not part of it.
const WWW_TAIL = /^[\w-]+(?:\.[\w-]+)*(?:[/?#:][^\s<]*)?/;
const count = (text, char) => text.split(char).length - 1;

function wwwLinkLength(text, pos) {
  let link = WWW_TAIL.exec(text.slice(pos))?.[0] ?? "";
  for (;;) {
    const trimmed = link.replace(/[?!.,:*_~'"]+$/, "");
    if (trimmed.endsWith(")") && count(trimmed, "(") < count(trimmed, ")")) link = trimmed.slice(0, -1);
    else if (/&\w+;$/.test(trimmed)) link = trimmed.replace(/&\w+;$/, "");
    else return trimmed.length;
  }
}

// Models write `<br>` for a line break where Markdown has none, above all inside table cells.
// Raw HTML stays text (html: false), except this one tag: it becomes markdown-it's own hard
// break. Runs before text_join, so an escaped `\<br>` (a separate token) stays text.
const BR_TAG = /<br\s*\/?>/i;

function brTags(state) {
  for (const block of state.tokens) {
    if (block.type !== "inline" || !BR_TAG.test(block.content)) continue;
    block.children = block.children.flatMap((token) => {
      if (token.type !== "text" || !BR_TAG.test(token.content)) return [token];
      return token.content.split(new RegExp(BR_TAG, "gi")).flatMap((text, index) => {
        const part = new state.Token("text", "", 0);
        part.content = text;
        return index === 0 ? [part] : [new state.Token("hardbreak", "br", 0), part];
      });
    });
  }
}

function newParser({ footnotes }) {
  const md = markdownit({
    html: false,
    linkify: true,
    typographer: false,
    highlight: (code, language) => highlightCode(code, language.toLowerCase()) ?? "",
  });
  // markdown-it already refuses javascript:, vbscript: and file:, but allows data: images and
  // relative links; a reply may link only to the web or to a mail address.
  md.validateLink = (url) => SAFE_LINK.test(url.trim());
  md.linkify.add("www.", {
    validate: wwwLinkLength,
    normalize: (match) => {
      match.url = `http://${match.url}`;
    },
  });
  md.use(texmath, { engine: katex, delimiters: ["dollars", "brackets"], katexOptions: KATEX_OPTIONS });
  md.core.ruler.after("inline", "br_tags", brTags);
  if (footnotes) md.use(footnote);
  // `- [ ] item` / `- [x] item`: a disabled checkbox, the item's text as its label.
  md.use(tasklist, { disabled: true, label: true });
  // An image in a reply would be fetched by every reader: show it as a link to its address.
  md.renderer.rules.image = (tokens, index) => {
    const token = tokens[index];
    const alt = token.content || token.attrGet("src");
    return `<a href="${escapeHtml(token.attrGet("src"))}">${escapeHtml(alt)}</a>`;
  };
  return md;
}

// Footnotes need the whole document (their list goes at the end), so the streaming parser leaves
// them out and the reply is drawn again with them once it is complete.
const streamingParser = newParser({ footnotes: false });
const fullParser = newParser({ footnotes: true });

// Styles come from markdown-it (table alignment) and KaTeX only: raw HTML is escaped, and every
// generator escapes `"` in text, so ` style="` can only be one of their attributes. It is renamed
// before DOMPurify parses the markup and applied again through CSSOM in `applyStyles`: a style
// attribute parsed from markup is refused by the page's Content-Security-Policy (no
// 'unsafe-inline'), and the parse happens in DOMPurify already.
function moveStyles(html) {
  return html.replaceAll(' style="', ' data-zeus-style="');
}

// SVG and MathML come only from KaTeX; anywhere else they are dropped, whatever produced them.
// The only input kept is a checkbox (task lists; raw HTML never gets this far, see `html: false`).
DOMPurify.addHook("uponSanitizeElement", (node, data) => {
  if ((data.tagName === "svg" || data.tagName === "math") && !node.parentElement?.closest(".katex")) {
    node.remove();
  } else if (data.tagName === "input" && node.getAttribute("type") !== "checkbox") {
    node.remove();
  }
});
// ...and it can never be ticked by the reader: a reply is a record, not a form.
DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.nodeName === "INPUT") node.setAttribute("disabled", "");
});

const PURIFY_OPTIONS = {
  RETURN_DOM_FRAGMENT: true,
  // DOMPurify's default minus the schemes a reply has no use for (tel:, cid:, xmpp:...). It is
  // applied to every attribute value, so values without a scheme (KaTeX's viewBox) must pass.
  ALLOWED_URI_REGEXP: /^(?:(?:https?|mailto):|[^a-z]|[a-z+.-]+(?:[^a-z+.\-:]|$))/i,
  FORBID_TAGS: ["style", "img", "image", "form", "button", "textarea", "select", "iframe"],
  FORBID_ATTR: ["src", "srcset", "xlink:href", "action", "formaction", "form", "name", "value"],
  ADD_ATTR: ["data-zeus-style"],
};

function applyStyles(root) {
  for (const element of root.querySelectorAll("[data-zeus-style]")) {
    element.style.cssText = element.dataset.zeusStyle;
    element.removeAttribute("data-zeus-style");
  }
}

/** Copies text; falls back to execCommand where the Clipboard API is missing (plain http). */
export async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    await navigator.clipboard.writeText(text);
    return;
  }
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

/** A button that copies `getText(button)` and says whether it worked. */
export function copyButton(label, getText, className = "btn btn--small") {
  const button = document.createElement("button");
  button.type = "button";
  button.className = className;
  button.textContent = "Copy";
  button.setAttribute("aria-label", label);
  button.addEventListener("click", async () => {
    try {
      await copyText(getText(button));
      button.textContent = "Copied";
    } catch {
      button.textContent = "Copy failed";
    }
    setTimeout(() => {
      button.textContent = "Copy";
    }, 1500);
  });
  return button;
}

// Code blocks get a header with their language and a copy button; tables scroll on their own;
// links open in a new tab without telling the target where they came from.
function decorate(fragment) {
  for (const pre of fragment.querySelectorAll("pre")) {
    const code = pre.querySelector("code");
    if (!code || pre.parentElement?.classList.contains("code-block")) continue;
    const language = /\blanguage-([^\s]+)/.exec(code.className)?.[1] ?? "";
    if (language) code.dataset.language = language;
    code.classList.add("hljs");
    const wrapper = document.createElement("div");
    wrapper.className = "code-block";
    const header = document.createElement("div");
    header.className = "code-block__header";
    const label = document.createElement("span");
    label.className = "code-block__language";
    label.textContent = language || "text";
    // markdown-it ends every code block with a newline that is not part of the code. Looked up
    // from the button at click time: a streaming redraw may keep this button but swap the code.
    const text = (button) => button.closest(".code-block").querySelector("code").textContent.replace(/\n$/, "");
    const button = copyButton(`Copy ${language || "text"} code`, text, "btn btn--small code-block__copy");
    header.append(label, button);
    pre.replaceWith(wrapper);
    wrapper.append(header, pre);
  }
  for (const table of fragment.querySelectorAll("table")) {
    const scroller = document.createElement("div");
    scroller.className = "table-scroll";
    table.replaceWith(scroller);
    scroller.append(table);
  }
  // The task list plugin ties each label to its checkbox by an id numbered per parse: ids that
  // repeat across the replies of a page and change at every redraw (so an unchanged item would
  // not compare equal while streaming). A checkbox inside its label needs no id.
  for (const checkbox of fragment.querySelectorAll("input[id]")) {
    const label = fragment.querySelector(`label[for="${CSS.escape(checkbox.id)}"]`);
    checkbox.removeAttribute("id");
    if (label) {
      label.removeAttribute("for");
      label.prepend(checkbox);
    }
  }
  for (const anchor of fragment.querySelectorAll("a[href]")) {
    if (anchor.getAttribute("href").startsWith("#")) continue; // footnote jumps stay in the page
    anchor.target = "_blank";
    anchor.rel = "noopener noreferrer nofollow";
  }
  applyStyles(fragment);
  return fragment;
}

function toFragment(md, tokens, env) {
  const html = md.renderer.render(tokens, md.options, env);
  return decorate(DOMPurify.sanitize(moveStyles(html), PURIFY_OPTIONS));
}

let documentCounter = 0;

/** The whole of `text` as a DocumentFragment of safe, decorated DOM. */
export function renderMarkdown(text) {
  // Footnote anchors must be unique on a page that shows many replies.
  const env = { docId: `r${(documentCounter += 1)}` };
  return toFragment(fullParser, fullParser.parse(text, env), env);
}

// The indexes of the tokens that start a top-level block (paragraph, list, fence, table...).
function blockStarts(tokens) {
  const starts = [];
  tokens.forEach((token, index) => {
    if (token.level === 0 && token.nesting !== -1 && token.map) starts.push(index);
  });
  return starts;
}

function offsetOfLine(text, line) {
  let offset = 0;
  for (let seen = 0; seen < line; seen += 1) {
    const next = text.indexOf("\n", offset);
    if (next < 0) return text.length;
    offset = next + 1;
  }
  return offset;
}

/**
 * Draws a reply into `body` while it grows. `update(text)` takes the whole text so far;
 * `finish(text)` the final one. A block is final once a later block has begun on a complete line
 * (CommonMark decides block structure line by line): it is never touched again. The blocks after
 * it are parsed anew on each update, with a blinking cursor after the last, and only the
 * elements that came out different replace those on the page (down to the items of a list), so
 * a selection in an unchanged part survives: removing a node, even to insert it again, collapses
 * a selection inside it.
 */
export function createReplyRenderer(body) {
  body.replaceChildren();
  let committed = 0; // characters of the text whose blocks are final
  let finalBlocks = 0; // body's first element children, drawn from those characters
  const env = {};

  const commitFinishedBlocks = (text) => {
    const pending = text.slice(committed);
    const lastNewline = pending.lastIndexOf("\n");
    if (lastNewline < 0) return;
    const complete = pending.slice(0, lastNewline + 1);
    const tokens = streamingParser.parse(complete, env);
    const starts = blockStarts(tokens);
    if (starts.length < 2) return;
    const last = starts[starts.length - 1];
    const fragment = toFragment(streamingParser, tokens.slice(0, last), env);
    const count = fragment.children.length;
    mergeBlocks(body, finalBlocks, fragment, false);
    finalBlocks += count;
    committed += offsetOfLine(complete, tokens[last].map[0]);
  };

  const drawLive = (text, streaming) => {
    const fragment = toFragment(streamingParser, streamingParser.parse(text.slice(committed), env), env);
    if (streaming) {
      const cursor = document.createElement("span");
      cursor.className = "cursor";
      cursor.setAttribute("aria-hidden", "true");
      const lastBlock = fragment.lastElementChild;
      (lastBlock && /^(P|UL|OL|H[1-6])$/.test(lastBlock.nodeName) ? deepestLast(lastBlock) : fragment).append(cursor);
    }
    mergeBlocks(body, finalBlocks, fragment, true);
  };

  return {
    update(text) {
      // Without its cursor the block drawn last compares equal to itself drawn as final.
      body.querySelector(".cursor")?.remove();
      commitFinishedBlocks(text);
      drawLive(text, true);
    },
    finish(text) {
      body.querySelector(".cursor")?.remove();
      // Footnotes and link reference definitions reach back into earlier blocks: such a reply is
      // drawn once more as a whole, and only the blocks that came out different are swapped in.
      if (/\[\^|^\s{0,3}\[[^\]]+\]:/m.test(text) || Object.keys(env.references ?? {}).length) {
        replaceChangedBlocks([body], renderMarkdown(text));
        return;
      }
      commitFinishedBlocks(text);
      drawLive(text, false);
    },
  };
}

/**
 * Makes `parent`'s element children from index `start` on equal to those of `fresh`, position by
 * position (see `morph`). `trim` removes the elements after the last of `fresh`.
 */
function mergeBlocks(parent, start, fresh, trim) {
  const blocks = [...fresh.children];
  blocks.forEach((block, index) => {
    const old = parent.children[start + index];
    if (old) morph(old, block);
    else parent.append(block);
  });
  if (trim) while (parent.children.length > start + blocks.length) parent.lastElementChild.remove();
}

/**
 * Makes the node `old` equal to `fresh` with the least change: an equal node stays, a text that
 * grew gets the new end appended (ranges in it stay put), an element with the same tag and
 * attributes keeps its node and has its children morphed in turn; anything else is replaced.
 * Attributes are never set here (a style attribute set from script is refused by the CSP).
 */
function morph(old, fresh) {
  if (old.isEqualNode(fresh)) return;
  if (old.nodeType === Node.TEXT_NODE && fresh.nodeType === Node.TEXT_NODE && fresh.data.startsWith(old.data)) {
    old.appendData(fresh.data.slice(old.data.length));
  } else if (old.nodeType === Node.ELEMENT_NODE && old.cloneNode(false).isEqualNode(fresh.cloneNode(false))) {
    const olds = [...old.childNodes];
    const freshes = [...fresh.childNodes];
    freshes.forEach((node, index) => {
      if (olds[index]) morph(olds[index], node);
      else old.append(node);
    });
    for (const extra of olds.slice(freshes.length)) extra.remove();
  } else {
    old.replaceWith(fresh);
  }
}

/**
 * Makes the blocks (element children) of `containers`, taken in order, equal to those of
 * `fresh`, touching only the blocks that differ: an unchanged block keeps its very nodes, so a
 * selection inside it survives (removing a node, even to insert it again, collapses a selection
 * in it). New blocks go before the next kept one, or at the end of the last container.
 */
function replaceChangedBlocks(containers, fresh) {
  const old = containers.flatMap((container) => [...container.children]);
  const kept = new Set();
  const wanted = [];
  let next = 0;
  for (const block of [...fresh.children]) {
    let match = next;
    while (match < old.length && !old[match].isEqualNode(block)) match += 1;
    if (match < old.length) {
      kept.add(old[match]);
      wanted.push(old[match]);
      next = match + 1;
    } else {
      wanted.push(block);
    }
  }
  for (const block of old) if (!kept.has(block)) block.remove();
  let anchor = null;
  for (const block of wanted.reverse()) {
    if (!kept.has(block)) {
      if (anchor) anchor.before(block);
      else containers[containers.length - 1].append(block);
    }
    anchor = block;
  }
}

function deepestLast(element) {
  let node = element;
  while (node.lastElementChild && /^(UL|OL|LI|P)$/.test(node.lastElementChild.nodeName)) node = node.lastElementChild;
  return node;
}
