// Code highlighting by highlight.js (vendored from npm, see tools/vendor_static.py): its core and
// the grammars analysts use. The output is highlight.js's escaped HTML (spans with hljs-* classes),
// which markdown.js passes through DOMPurify with the rest of a reply.

import hljs from "../vendor/highlight/core.min.js";

// Keep in step with HIGHLIGHT_LANGUAGES in tools/vendor_static.py.
const LANGUAGES = [
  "awk", "bash", "c", "cmake", "cpp", "csharp", "css", "dart", "diff", "dockerfile", "elixir",
  "excel", "go", "graphql", "groovy", "haskell", "http", "ini", "java", "javascript", "json",
  "julia", "kotlin", "latex", "less", "lua", "makefile", "markdown", "matlab", "nginx",
  "objectivec", "perl", "pgsql", "php", "plaintext", "powershell", "protobuf", "python",
  "python-repl", "r", "ruby", "rust", "sas", "scala", "scss", "shell", "sql", "stata", "swift",
  "typescript", "vbnet", "xml", "yaml",
];

await Promise.all(
  LANGUAGES.map(async (name) => {
    const grammar = await import(`../vendor/highlight/languages/${name}.min.js`);
    hljs.registerLanguage(name, grammar.default);
  }),
);

/** Whether `language` (a name or alias such as `ts`, `sh`, `toml`, `html`) has a grammar here. */
export function knowsLanguage(language) {
  return Boolean(language) && hljs.getLanguage(language) !== undefined;
}

/**
 * `code` as escaped HTML with hljs-* spans, or null when `language` is unknown (the caller then
 * escapes the text itself). Never throws: a grammar failing on odd input leaves the code plain.
 */
export function highlightCode(code, language) {
  if (!knowsLanguage(language)) return null;
  try {
    return hljs.highlight(code, { language, ignoreIllegals: true }).value;
  } catch {
    return null;
  }
}

export const highlightLanguages = LANGUAGES;
