// A small syntax highlighter for code blocks in replies: keywords, strings, comments, numbers and
// function names for the languages a chat model writes most. Output is spans holding text nodes.

const C_LIKE_KEYWORDS =
  "auto break case catch char class const continue default delete do double else enum extern final finally float for " +
  "friend goto if implements import include inline int interface long namespace new operator package private protected " +
  "public register return short signed sizeof static struct super switch template this throw throws try typedef " +
  "typename union unsigned using virtual void volatile while fn let mut impl trait pub use mod match crate self Self " +
  "func go chan defer map range select type var boolean byte extends instanceof native synchronized transient " +
  "override val when object fun";

const LANGUAGES = {
  python: {
    keywords:
      "and as assert async await break class continue def del elif else except finally for from global if import " +
      "in is lambda nonlocal not or pass raise return try while with yield match case print self",
    literals: "True False None",
    lineComment: ["#"],
    strings: ['"""', "'''", '"', "'"],
  },
  javascript: {
    keywords:
      "async await break case catch class const continue debugger default delete do else export extends finally for " +
      "from function if import in instanceof let new of return static super switch this throw try typeof var void " +
      "while with yield interface type enum implements public private protected readonly as",
    literals: "true false null undefined NaN Infinity",
    lineComment: ["//"],
    blockComment: ["/*", "*/"],
    strings: ['"', "'", "`"],
  },
  clike: {
    keywords: C_LIKE_KEYWORDS,
    literals: "true false null nullptr NULL nil None",
    lineComment: ["//"],
    blockComment: ["/*", "*/"],
    strings: ['"', "'", "`"],
    preprocessor: true,
  },
  bash: {
    keywords:
      "if then else elif fi for while until do done case esac function in return export local readonly set unset " +
      "source echo exit cd sudo",
    literals: "true false",
    lineComment: ["#"],
    strings: ['"', "'"],
    variables: true,
  },
  sql: {
    keywords:
      "select from where and or not insert into values update set delete create table index view drop alter add " +
      "column primary key foreign references join left right inner outer full on group by order having limit offset " +
      "as distinct union all case when then else end is in like between exists returning with begin commit rollback " +
      "grant revoke default constraint unique check cascade",
    literals: "null true false",
    lineComment: ["--"],
    blockComment: ["/*", "*/"],
    strings: ["'", '"'],
    caseInsensitive: true,
  },
  json: { keywords: "", literals: "true false null", strings: ['"'], keys: true },
  yaml: { keywords: "", literals: "true false null yes no on off", lineComment: ["#"], strings: ['"', "'"], keys: true },
  css: { keywords: "", literals: "", blockComment: ["/*", "*/"], strings: ['"', "'"] },
  html: { keywords: "", literals: "", blockComment: ["<!--", "-->"], strings: ['"', "'"], tags: true },
};

const ALIASES = {
  py: "python",
  python3: "python",
  js: "javascript",
  jsx: "javascript",
  mjs: "javascript",
  ts: "javascript",
  tsx: "javascript",
  typescript: "javascript",
  sh: "bash",
  shell: "bash",
  zsh: "bash",
  console: "bash",
  c: "clike",
  h: "clike",
  cpp: "clike",
  "c++": "clike",
  cc: "clike",
  cs: "clike",
  csharp: "clike",
  java: "clike",
  go: "clike",
  golang: "clike",
  rust: "clike",
  rs: "clike",
  kotlin: "clike",
  swift: "clike",
  scala: "clike",
  postgres: "sql",
  postgresql: "sql",
  yml: "yaml",
  xml: "html",
  svg: "html",
};

const compiled = new Map();

function languageSpec(name) {
  const key = ALIASES[name] ?? name;
  const spec = LANGUAGES[key];
  if (!spec) return null;
  if (!compiled.has(key)) {
    const fold = (word) => (spec.caseInsensitive ? word.toLowerCase() : word);
    compiled.set(key, {
      ...spec,
      keywordSet: new Set(spec.keywords.split(/\s+/).filter(Boolean).map(fold)),
      literalSet: new Set(spec.literals.split(/\s+/).filter(Boolean).map(fold)),
      fold,
    });
  }
  return compiled.get(key);
}

export function isHighlightable(language) {
  return languageSpec((language ?? "").toLowerCase()) !== null;
}

function readString(code, start, quote) {
  let index = start + quote.length;
  const multiline = quote.length === 3 || quote === "`";
  while (index < code.length) {
    if (code[index] === "\\") {
      index += 2;
      continue;
    }
    if (code.startsWith(quote, index)) return index + quote.length;
    if (!multiline && code[index] === "\n") return index;
    index += 1;
  }
  return code.length;
}

const NUMBER = /0[xX][0-9a-fA-F_]+|0[bB][01_]+|\d[\d_]*(?:\.\d[\d_]*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?/y;
const IDENTIFIER = /[A-Za-z_$][\w$]*/y;

/** Tokens [{kind, text}] where kind is null for plain text. */
export function tokenize(code, language) {
  const spec = languageSpec((language ?? "").toLowerCase());
  if (!spec) return [{ kind: null, text: code }];
  const tokens = [];
  let plain = "";
  const push = (kind, text) => {
    if (plain) tokens.push({ kind: null, text: plain });
    plain = "";
    tokens.push({ kind, text });
  };
  let index = 0;
  let lineStart = true;
  while (index < code.length) {
    const char = code[index];
    const previous = index > 0 ? code[index - 1] : "\n";

    const lineComment = spec.lineComment?.find(
      (marker) => code.startsWith(marker, index) && (marker !== "#" || spec !== languageSpec("bash") || /\s/.test(previous)),
    );
    if (lineComment) {
      const end = code.indexOf("\n", index);
      const stop = end < 0 ? code.length : end;
      push("comment", code.slice(index, stop));
      index = stop;
      continue;
    }
    if (spec.blockComment && code.startsWith(spec.blockComment[0], index)) {
      const end = code.indexOf(spec.blockComment[1], index + spec.blockComment[0].length);
      const stop = end < 0 ? code.length : end + spec.blockComment[1].length;
      push("comment", code.slice(index, stop));
      index = stop;
      continue;
    }
    if (spec.preprocessor && lineStart && char === "#") {
      const end = code.indexOf("\n", index);
      const stop = end < 0 ? code.length : end;
      push("meta", code.slice(index, stop));
      index = stop;
      continue;
    }
    const quote = spec.strings.find((candidate) => code.startsWith(candidate, index));
    if (quote) {
      const stop = readString(code, index, quote);
      const text = code.slice(index, stop);
      const isKey = spec.keys && /^\s*:/.test(code.slice(stop, stop + 20));
      push(isKey ? "attr" : "string", text);
      index = stop;
      continue;
    }
    if (spec.tags && char === "<") {
      const match = /<\/?[A-Za-z][\w:-]*/y;
      match.lastIndex = index;
      const found = match.exec(code);
      if (found) {
        push("keyword", found[0]);
        index += found[0].length;
        continue;
      }
    }
    if (spec.variables && char === "$") {
      const match = /\$(?:\{[^}\n]*\}|[A-Za-z_]\w*|[0-9#?@*$!-])/y;
      match.lastIndex = index;
      const found = match.exec(code);
      if (found) {
        push("variable", found[0]);
        index += found[0].length;
        continue;
      }
    }
    if (/[0-9.]/.test(char) && !/[\w$]/.test(previous)) {
      NUMBER.lastIndex = index;
      const found = NUMBER.exec(code);
      if (found) {
        push("number", found[0]);
        index += found[0].length;
        lineStart = false;
        continue;
      }
    }
    if (/[A-Za-z_$]/.test(char)) {
      IDENTIFIER.lastIndex = index;
      const word = IDENTIFIER.exec(code)[0];
      const folded = spec.fold(word);
      let kind = null;
      if (spec.keywordSet.has(folded)) kind = "keyword";
      else if (spec.literalSet.has(folded)) kind = "literal";
      else if (spec.keys && /^\s*:(?!:)/.test(code.slice(index + word.length, index + word.length + 20)) && lineStart)
        kind = "attr";
      else if (code[index + word.length] === "(") kind = "function";
      if (kind) push(kind, word);
      else plain += word;
      index += word.length;
      lineStart = false;
      continue;
    }
    plain += char;
    if (char === "\n") lineStart = true;
    else if (!/[ \t-]/.test(char)) lineStart = false;
    index += 1;
  }
  if (plain) tokens.push({ kind: null, text: plain });
  return tokens;
}

/** Fills a <code> element with highlighted spans (text nodes only). */
export function highlightInto(codeElement, code, language) {
  codeElement.replaceChildren();
  for (const token of tokenize(code, language)) {
    if (token.kind === null) {
      codeElement.append(document.createTextNode(token.text));
    } else {
      const span = document.createElement("span");
      span.className = `tok-${token.kind}`;
      span.textContent = token.text;
      codeElement.append(span);
    }
  }
}
