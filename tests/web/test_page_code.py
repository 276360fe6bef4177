"""The pages' own code in a real browser, without the API: markdown rendering (markdown-it,
highlight.js, KaTeX, DOMPurify), incremental rendering while a reply streams, SSE parsing.

The renderer is where model output meets the DOM, so it is tested here with hostile input directly;
test_chat.py checks the same through the whole stack. Every test also fails on a refusal of the
page's Content-Security-Policy (module_page asserts a clean page), which KaTeX's styles would hit.
"""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import Page, expect

pytestmark = pytest.mark.browser

HOSTILE_MARKDOWN = """\
<img src=x onerror="window.__xss = 'img'">
<script>window.__xss = 'script'</script>
<iframe src="javascript:window.__xss='iframe'"></iframe>
[click me](javascript:window.__xss='link')
[data](data:text/html,<script>window.__xss='data'</script>)
![pic](https://example.com/x.png" onerror="window.__xss='image')
**bold <b onclick="window.__xss='bold'">b</b>**
```html
<script>window.__xss = 'code'</script>
```
| a <img src=x> | b |
|---|---|
| <svg onload="window.__xss='svg'"> | `<script>` |
"""


@pytest.fixture
def module_page(new_session, static_server: str) -> Page:
    """A page on the static server with the page modules importable as window.zeus."""
    session = new_session()
    page = session.page
    # The chat page only provides the origin: without an API behind this server it stops at its
    # boot screen ("not found"), and the tests replace the body with what they render.
    page.goto(f"{static_server}/index.html")
    page.evaluate(
        """async () => {
            window.zeus = {
                markdown: await import('/js/markdown.js'),
                sse: await import('/js/sse.js'),
                api: await import('/js/api.js'),
            };
        }"""
    )
    yield page
    session.watch.assert_clean()


def render(page: Page, markdown: str) -> dict:
    return page.evaluate(
        """(text) => {
            const host = document.createElement('div');
            host.id = 'render-host';
            host.className = 'markdown';
            host.append(window.zeus.markdown.renderMarkdown(text));
            document.body.replaceChildren(host);
            return {
                text: host.textContent,
                tags: [...host.querySelectorAll('*')].map((node) => node.tagName.toLowerCase()),
                attributes: [...host.querySelectorAll('*')].flatMap((node) => node.getAttributeNames()),
                links: [...host.querySelectorAll('a')].map((node) => node.getAttribute('href')),
            };
        }""",
        markdown,
    )


def test_html_in_markdown_stays_text(module_page: Page) -> None:
    result = render(module_page, HOSTILE_MARKDOWN)

    forbidden = {"img", "script", "iframe", "svg", "b", "object", "embed", "style", "link"}
    assert forbidden.isdisjoint(result["tags"]), result["tags"]
    assert not [name for name in result["attributes"] if name.startswith("on") or name in {"style", "src"}]
    # Images are never loaded; an http(s) image URL may appear as a plain link, nothing else may.
    assert all(link.startswith("https://") for link in result["links"]), result["links"]
    assert "<img src=x onerror=\"window.__xss = 'img'\">" in result["text"]
    assert "<script>window.__xss = 'script'</script>" in result["text"]
    module_page.wait_for_timeout(200)  # an injected onerror would fire asynchronously
    assert module_page.evaluate("window.__xss") is None


def test_markdown_structure(module_page: Page) -> None:
    result = render(
        module_page,
        "# Title\n\nSome **bold**, *italic*, `code` and a [link](https://example.com/a?b=1).\n\n"
        "- one\n- two\n  - nested\n\n1. first\n2. second\n\n> quoted\n\n"
        "```python\nprint('hi')  # greet\n```\n\n"
        "| x | y |\n|---|--:|\n| 1 | 2 |\n",
    )

    expected_tags = (
        "h1",
        "strong",
        "em",
        "code",
        "a",
        "ul",
        "ol",
        "li",
        "blockquote",
        "pre",
        "table",
        "th",
        "td",
    )
    for tag in expected_tags:
        assert tag in result["tags"], f"<{tag}> missing from {result['tags']}"
    assert result["links"] == ["https://example.com/a?b=1"]
    assert module_page.locator("#render-host ul ul li").inner_text() == "nested"
    assert module_page.locator("#render-host .code-block__language").inner_text() == "python"
    assert module_page.locator("#render-host .hljs-built_in").first.inner_text() == "print"
    assert module_page.locator("#render-host .hljs-comment").inner_text() == "# greet"
    assert module_page.locator("#render-host .hljs-string").inner_text() == "'hi'"


def test_unclosed_fence_while_streaming_renders_as_code(module_page: Page) -> None:
    result = render(module_page, "Here:\n```js\nconst answer = 42;")

    assert "pre" in result["tags"]
    assert module_page.locator("#render-host code").inner_text() == "const answer = 42;"


def test_copy_button_copies_the_code(module_page: Page) -> None:
    module_page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    render(module_page, '```bash\necho "<b>hi</b>" | wc -c\n```')

    module_page.get_by_role("button", name="Copy bash code").click()

    # The label changes once the clipboard write resolves, a moment after the click returns.
    expect(module_page.get_by_role("button", name="Copy bash code")).to_have_text("Copied")
    assert module_page.evaluate("navigator.clipboard.readText()") == 'echo "<b>hi</b>" | wc -c'


def test_copy_button_of_a_streamed_code_block_copies_the_final_code(module_page: Page) -> None:
    """While a reply streams, its code block is redrawn in place (the language arrives letter by
    letter, the code line by line); Copy gives the code as it ends up."""
    module_page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    text = "```python\nfor i in range(3):\n    print(i)\n```\n"
    module_page.evaluate(
        """(text) => {
            const host = document.createElement('div');
            host.className = 'markdown';
            document.body.replaceChildren(host);
            const renderer = window.zeus.markdown.createReplyRenderer(host);
            for (let end = 1; end <= text.length; end += 1) renderer.update(text.slice(0, end));
            renderer.finish(text);
        }""",
        text,
    )

    module_page.get_by_role("button", name="Copy python code").click()

    expect(module_page.get_by_role("button", name="Copy python code")).to_have_text("Copied")
    assert module_page.evaluate("navigator.clipboard.readText()") == "for i in range(3):\n    print(i)"


def test_sse_parser_handles_split_chunks_and_crlf(module_page: Page) -> None:
    events = module_page.evaluate(
        """async () => {
            const chunks = [
                'event: start\\r\\ndata: {"assistant_message_id": 7}\\r\\n\\r\\nev',
                'ent: delta\\ndata: {"text": "Hel"}\\n',
                '\\n: a comment line\\n\\nevent: delta\\ndata: {"text": "lo\\\\n"}\\n\\n',
                'event: done\\ndata: {"status": "complete"}\\n\\n',
            ];
            const encoder = new TextEncoder();
            const body = new ReadableStream({
                start(controller) {
                    for (const chunk of chunks) controller.enqueue(encoder.encode(chunk));
                    controller.close();
                },
            });
            const seen = [];
            for await (const event of window.zeus.sse.readServerSentEvents(new Response(body))) {
                seen.push([event.event, JSON.parse(event.data)]);
            }
            return seen;
        }"""
    )

    assert events == [
        ["start", {"assistant_message_id": 7}],
        ["delta", {"text": "Hel"}],
        ["delta", {"text": "lo\n"}],
        ["done", {"status": "complete"}],
    ]


def test_sse_parser_decodes_multibyte_characters_split_across_chunks(module_page: Page) -> None:
    text = module_page.evaluate(
        """async () => {
            const bytes = new TextEncoder().encode('event: delta\\ndata: {"text": "é🙂"}\\n\\n');
            const body = new ReadableStream({
                start(controller) {
                    for (const byte of bytes) controller.enqueue(new Uint8Array([byte]));
                    controller.close();
                },
            });
            let text = '';
            for await (const event of window.zeus.sse.readServerSentEvents(new Response(body))) {
                text += JSON.parse(event.data).text;
            }
            return text;
        }"""
    )

    assert text == "é🙂"


def test_error_messages_say_what_happened_and_what_to_do(module_page: Page) -> None:
    messages = module_page.evaluate(
        """() => {
            const { ApiError, describeError } = window.zeus.api;
            return {
                lost: describeError(new ApiError(0, 'x')),
                busy: describeError(new ApiError(429, 'server busy', { retryAfterS: 7 })),
                server: describeError(new ApiError(500, 'request failed')),
                unavailable: describeError(new ApiError(503, 'database unavailable')),
                refused: describeError(new ApiError(400, 'prompt too long: the limit is 512 tokens')),
            };
        }"""
    )

    assert messages == {
        "lost": "Lost connection to the server. Check your network, then retry.",
        "busy": "server busy. Retry in 7 s.",
        "server": "Server error (500). Please retry; if it keeps happening, tell an administrator.",
        "unavailable": "Server error (503: database unavailable). Please retry; "
        "if it keeps happening, tell an administrator.",
        "refused": "prompt too long: the limit is 512 tokens",
    }


# Aimed at the new renderers: raw HTML blocks and inline HTML, every way markdown-it writes a link
# (inline, reference, autolink, linkify), images, footnotes, and KaTeX's link and HTML commands.
RENDERER_PAYLOADS = {
    "raw html block": '<div onclick="window.__xss=1">x</div>\n\n<style>body{display:none}</style>',
    "inline html": 'a <a href="javascript:window.__xss=1">b</a> <span style="color:red">c</span>',
    "javascript link": "[x](javascript:window.__xss=1) [y](JaVaScRiPt:window.__xss=1) "
    "[z](  javascript:alert(1))",
    "entity javascript link": "[x](&#106;avascript:window.__xss=1) [y](java&#x09;script:alert(1))",
    "data link": "[x](data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==) "
    "![i](data:image/png;base64,AAAA)",
    "vbscript and file": "[x](vbscript:msgbox) [y](file:///etc/passwd)",
    "reference link": "[x][evil]\n\n[evil]: javascript:window.__xss=1",
    "autolink": "<javascript:window.__xss=1> <data:text/html,x>",
    "svg": '<svg onload="window.__xss=1"><script>window.__xss=2</script></svg>',
    "math href": "$\\href{javascript:window.__xss=1}{click}$ and $$\\url{javascript:window.__xss=1}$$",
    "math html": "$\\htmlClass{x}{y}$ $\\htmlStyle{color:red}{y}$ $\\htmlData{onclick=alert(1)}{y}$ "
    "$\\includegraphics{x.png}$",
    "footnote": '[^1]\n\n[^1]: <img src=x onerror="window.__xss=1"> [a](javascript:alert(1))',
    "link title": '[x](https://example.com "a\\" onmouseover=\\"window.__xss=1")',
    "code info string": '```"><img src=x onerror=window.__xss=1>\ncode\n```',
    "task list": '- [ ] <input onfocus="window.__xss=1" autofocus>\n- [x] [a](javascript:alert(1))\n'
    '- [ ]<button onclick="window.__xss=1">b</button>',
}


@pytest.mark.parametrize("name", list(RENDERER_PAYLOADS))
def test_payloads_aimed_at_the_renderers_stay_inert(module_page: Page, name: str) -> None:
    result = render(module_page, RENDERER_PAYLOADS[name])

    forbidden = {"script", "iframe", "img", "image", "object", "embed", "style", "form", "button", "div"}
    assert forbidden.isdisjoint(result["tags"]) or name == "code info string", result["tags"]
    # The one form control a reply may hold: a task list's disabled checkbox.
    inputs = module_page.locator("#render-host input")
    assert inputs.count() == module_page.locator("#render-host input[type=checkbox][disabled]").count()
    assert not [attribute for attribute in result["attributes"] if attribute.startswith("on")]
    assert all(link.startswith(("https://", "http://", "mailto:", "#")) for link in result["links"]), result[
        "links"
    ]
    # SVG only ever inside KaTeX's own output.
    assert module_page.locator("#render-host svg:not(.katex svg)").count() == 0
    module_page.wait_for_timeout(100)
    assert module_page.evaluate("window.__xss") is None


def test_commonmark_details_that_the_old_renderer_got_wrong(module_page: Page) -> None:
    render(
        module_page,
        "Setext\n======\n\n    indented  code\n      keeps its indent\n\n"
        "[ref link][r] and <https://example.org/auto> and &copy; &amp; ***both***\n\n"
        "A note[^n].\n\n[r]: https://example.com/ref\n[^n]: The footnote.\n",
    )
    host = module_page.locator("#render-host")

    expect(host.locator("h1")).to_have_text("Setext")
    expect(host.locator("pre code").first).to_have_text("indented  code\n  keeps its indent\n")
    expect(host.locator("a", has_text="ref link")).to_have_attribute("href", "https://example.com/ref")
    expect(host.locator("a", has_text="https://example.org/auto")).to_have_attribute(
        "href", "https://example.org/auto"
    )
    expect(host.locator("p").nth(0)).to_contain_text("© &")
    expect(host.locator("em > strong, strong > em")).to_have_text("both")
    expect(host.locator(".footnotes li")).to_contain_text("The footnote.")


def test_task_lists_give_disabled_checkboxes(module_page: Page) -> None:
    render(
        module_page,
        "- [ ] write the *tests*\n- [x] ship it\n- not a task\n  - [X] nested done\n\n1. [ ] numbered\n",
    )
    host = module_page.locator("#render-host")
    boxes = host.locator("input[type=checkbox]")

    expect(boxes).to_have_count(4)
    for index in range(4):
        expect(boxes.nth(index)).to_be_disabled()
    assert [boxes.nth(index).is_checked() for index in range(4)] == [False, True, True, False]
    # The brackets become the checkbox; the rest of the item stays Markdown, labelling it.
    expect(host.locator("li").first).to_have_text("write the tests")
    expect(host.locator("li").first.locator("em")).to_have_text("tests")
    expect(host.get_by_label("ship it")).to_be_checked()
    expect(host.locator("li", has_text="not a task").locator("> input")).to_have_count(0)
    assert "[ ]" not in host.inner_text() and "[x]" not in host.inner_text()
    # A reader cannot tick them: the reply is a record.
    host.get_by_label("write the tests").click(force=True)
    expect(boxes.first).not_to_be_checked()


def test_task_list_checkboxes_sit_in_their_labels_without_ids(module_page: Page) -> None:
    """The same list twice on a page (two replies) repeats no id, and draws the same DOM each
    time (so an unchanged item compares equal while a reply streams)."""
    result = module_page.evaluate(
        """() => {
            const host = document.createElement('div');
            document.body.replaceChildren(host);
            host.append(window.zeus.markdown.renderMarkdown('- [ ] a\\n- [x] b'));
            host.append(window.zeus.markdown.renderMarkdown('- [ ] a\\n- [x] b'));
            const [first, second] = host.querySelectorAll('ul');
            return {
                ids: host.querySelectorAll('[id], [for]').length,
                labelled: [...host.querySelectorAll('input')].map((box) => box.labels[0]?.textContent.trim()),
                same: first.isEqualNode(second),
            };
        }"""
    )

    assert result == {"ids": 0, "labelled": ["a", "b", "a", "b"], "same": True}


def test_footnotes_get_a_section_with_back_links(module_page: Page) -> None:
    render(module_page, "Claim[^src] and again[^src], another[^2].\n\n[^src]: A source.\n[^2]: Second.\n")
    host = module_page.locator("#render-host")

    expect(host.locator("section.footnotes li")).to_have_count(2)
    expect(host.locator("sup.footnote-ref a")).to_have_count(3)
    # Every citation jumps to its note and every note links back to each citation, by ids that
    # exist in the page (DOMPurify keeps them).
    links = module_page.evaluate(
        """() => [...document.querySelectorAll('#render-host a[href^="#"]')].map((a) => ({
            href: a.getAttribute('href'),
            back: a.classList.contains('footnote-backref'),
            target: document.getElementById(decodeURIComponent(a.hash.slice(1)))?.tagName ?? null,
        }))"""
    )
    assert [link["back"] for link in links].count(True) == 3, links
    assert all(link["target"] for link in links), links
    assert {link["target"] for link in links if link["back"]} == {"A"}
    assert {link["target"] for link in links if not link["back"]} == {"LI"}
    expect(host.locator("section.footnotes li").first).to_contain_text("A source.")
    # Links inside the reply stay in the page; only outside links open a new tab.
    assert host.locator("a[href^='#'][target]").count() == 0


def test_entities_autolinks_and_nested_emphasis(module_page: Page) -> None:
    render(
        module_page,
        "&lt;tag&gt; &quot;q&quot; &#8212; &nbsp;x &notanentity;\n\n"
        "<https://example.org/a_b> <mailto:team@example.org> https://example.com/x_(y), ok\n"
        "(see www.example.com/wiki/A_(b).) Edit setup.py and README.md.\n\n"
        "***bold italic*** **bold *inner* bold** ~~gone~~\n",
    )
    host = module_page.locator("#render-host")

    expect(host.locator("p").first).to_have_text('<tag> "q" \u2014 \u00a0x &notanentity;')
    links = host.locator("a")
    assert [links.nth(i).get_attribute("href") for i in range(links.count())] == [
        "https://example.org/a_b",
        "mailto:team@example.org",
        "https://example.com/x_(y)",
        "http://www.example.com/wiki/A_(b)",
    ]
    expect(host.locator("em > strong, strong > em").first).to_have_text("bold italic")
    expect(host.locator("strong > em")).to_have_text("inner")
    expect(host.locator("s")).to_have_text("gone")


def test_br_tags_break_lines_and_other_html_stays_text(module_page: Page) -> None:
    render(
        module_page,
        "| step | notes |\n|---|---|\n| 1 | first<br>second<BR/>third |\n\n"
        "escaped \\<br> and `<br>` and <b>bold</b> and <br onclick=alert(1)>\n\n3. three\n4. four\n",
    )
    host = module_page.locator("#render-host")

    expect(host.locator("td br")).to_have_count(2)
    expect(host.locator("td").nth(1)).to_have_text("first\nsecond\nthird")
    # Only the bare tag: an escaped one, one in code and one with attributes stay as written.
    expect(host.locator("p").first).to_have_text(
        "escaped <br> and <br> and <b>bold</b> and <br onclick=alert(1)>"
    )
    expect(host.locator("p br, b")).to_have_count(0)
    expect(host.locator("ol")).to_have_attribute("start", "3")


def test_math_is_typeset_by_katex(module_page: Page) -> None:
    render(module_page, "Inline $e^{i\\pi} + 1 = 0$ and display:\n\n$$\\int_0^1 x^2\\,dx = \\frac{1}{3}$$\n")
    host = module_page.locator("#render-host")

    expect(host.locator(".katex")).to_have_count(2)
    expect(host.locator(".katex-display")).to_have_count(1)
    expect(host.locator("math").first).to_be_attached()
    # KaTeX's inline sizes arrive through CSSOM (the CSP refuses style attributes in markup).
    assert module_page.evaluate("[...document.querySelectorAll('#render-host .katex [style]')].length") > 0


def test_math_in_the_delimiters_models_use_and_dollars_that_are_money(module_page: Page) -> None:
    render(
        module_page,
        "Inline \\(a^2 + b^2 = c^2\\) and display:\n\n\\[\n\\sum_{i=1}^n i\n\\]\n\n"
        "It costs $5 and $10 per month.\n\nLet $x$ be.\n\n$$\nE = mc^2\n$$\n",
    )
    host = module_page.locator("#render-host")

    expect(host.locator(".katex")).to_have_count(4)
    expect(host.locator(".katex-display")).to_have_count(2)
    expect(host.locator("p", has_text="It costs")).to_have_text("It costs $5 and $10 per month.")
    assert "\\(" not in host.inner_text() and "\\[" not in host.inner_text()


@pytest.mark.parametrize(
    ("language", "code", "token", "text"),
    [
        # A lifetime is one symbol, not the start of a character literal that runs on.
        ("rust", "fn longest<'a>(x: &'a str) -> &'a str { x }", ".hljs-symbol", "'a"),
        (
            "typescript",
            "interface User { id: number }\nconst u: User = { id: 1 };",
            ".hljs-keyword",
            "interface",
        ),
        ("ts", "type Id = string | number;", ".hljs-keyword", "type"),
        ("dockerfile", "FROM debian:12\nRUN apt-get update", ".hljs-keyword", "FROM"),
        ("diff", "--- a\n+++ b\n-old\n+new", ".hljs-addition", "+new"),
        ("toml", '[server]\nport = 8080 # web\nname = "zeus"', ".hljs-section", "[server]"),
        ("sql", "SELECT id FROM users WHERE id = 1;", ".hljs-keyword", "SELECT"),
        ("postgresql", "SELECT now()::date;", ".hljs-keyword", "SELECT"),
        ("yaml", "key: value\nlist:\n  - 1", ".hljs-attr", "key:"),
        ("go", 'func main() { fmt.Println("hi") }', ".hljs-keyword", "func"),
        ("python", "def f(x):\n    return x  # same", ".hljs-keyword", "def"),
        ("r", "df <- read.csv('a.csv')\nsummary(df)", ".hljs-string", "'a.csv'"),
        ("jsx", "const a = <div className='x'>hi</div>;", ".hljs-keyword", "const"),
        ("sh", 'for f in *.txt; do echo "$f"; done', ".hljs-keyword", "for"),
        ("console", "$ ls -la\ntotal 0", ".hljs-meta", "$"),
        ("json", '{"a": [1, true, null]}', ".hljs-attr", '"a"'),
        ("html", "<p class='x'>hi</p>", ".hljs-tag", "<p class='x'>"),
        ("excel", "=SUM(A1:A10)", ".hljs-built_in", "SUM"),
        ("stata", "regress y x1 x2, robust", ".hljs-keyword", "regress"),
        ("http", "GET /api/health HTTP/1.1\nHost: example.com", ".hljs-attribute", "Host"),
    ],
)
def test_languages_analysts_use_are_highlighted(
    module_page: Page, language: str, code: str, token: str, text: str
) -> None:
    render(module_page, f"```{language}\n{code}\n```")

    expect(module_page.locator(f"#render-host {token}").first).to_have_text(text)
    expect(module_page.locator("#render-host pre code")).to_have_text(code + "\n")


def test_streaming_keeps_finished_blocks_and_the_selection(module_page: Page) -> None:
    text = "First paragraph here.\n\n```js\nconst a = 1;\n```\n\n- [ ] one\n- [x] two\n\nLast words $x^2$."
    result = module_page.evaluate(
        """async (text) => {
            const host = document.createElement('div');
            host.className = 'markdown';
            document.body.replaceChildren(host);
            const renderer = window.zeus.markdown.createReplyRenderer(host);
            let firstParagraph = null;
            let codeBlock = null;
            let selected = '';
            for (let end = 1; end <= text.length; end += 3) {
                renderer.update(text.slice(0, end));
                const paragraph = host.querySelector('p');
                if (!codeBlock && end > text.indexOf('- [x]')) codeBlock = host.querySelector('.code-block');
                if (firstParagraph === null && end > 30) {
                    firstParagraph = paragraph;
                    const range = document.createRange();
                    range.selectNodeContents(firstParagraph);
                    getSelection().removeAllRanges();
                    getSelection().addRange(range);
                }
            }
            renderer.finish(text);
            selected = getSelection().toString();
            const full = document.createElement('div');
            full.append(window.zeus.markdown.renderMarkdown(text));
            const html = (node) => node.innerHTML.replace(/>\\s+</g, '><').trim();
            return {
                same: host.querySelector('p') === firstParagraph,
                sameCode: host.querySelector('.code-block') === codeBlock,
                selected,
                html: html(host),
                fullHtml: html(full),
                cursor: host.querySelectorAll('.cursor').length,
                boxes: [...host.querySelectorAll('input')].map((b) => [b.type, b.disabled, b.checked]),
            };
        }""",
        text,
    )

    assert result["same"], "the finished first paragraph was drawn again"
    assert result["selected"] == "First paragraph here."
    # The code block was final once the list began on a complete line, and stayed as drawn.
    assert result["sameCode"], "the finished code block was drawn again"
    assert result["html"] == result["fullHtml"]
    assert result["cursor"] == 0
    assert result["boxes"] == [["checkbox", True, False], ["checkbox", True, True]]


def test_a_selection_in_a_list_that_is_still_streaming_survives(module_page: Page) -> None:
    """A list is one block until it ends; its finished items keep their nodes while later items
    arrive, and when the list itself becomes final."""
    text = "".join(f"{n}. Item number {n} of the list.\n" for n in range(1, 13)) + "\nAfter the list.\n"
    result = module_page.evaluate(
        """(text) => {
            const host = document.createElement('div');
            host.className = 'markdown';
            document.body.replaceChildren(host);
            const renderer = window.zeus.markdown.createReplyRenderer(host);
            let second = null;
            for (let end = 1; end <= text.length; end += 4) {
                renderer.update(text.slice(0, end));
                if (second === null && end > text.indexOf('5. Item')) {
                    second = host.querySelectorAll('li')[1];
                    const range = document.createRange();
                    range.selectNodeContents(second);
                    getSelection().removeAllRanges();
                    getSelection().addRange(range);
                }
            }
            renderer.finish(text);
            return {
                same: host.querySelectorAll('li')[1] === second,
                selected: getSelection().toString(),
                items: host.querySelectorAll('ol > li').length,
                start: host.querySelector('ol').getAttribute('start'),
                last: host.lastElementChild.textContent,
            };
        }""",
        text,
    )

    assert result == {
        "same": True,
        "selected": "Item number 2 of the list.",
        "items": 12,
        "start": None,
        "last": "After the list.",
    }


@pytest.mark.parametrize(
    ("text", "selector"),
    [
        (" ".join(f"word{n}" for n in range(300)) + ".", "p"),
        (
            "```python\n" + "".join(f"value_{n} = compute({n})  # step {n}\n" for n in range(60)) + "```\n",
            "code",
        ),
    ],
    ids=["paragraph", "code block"],
)
def test_a_selection_in_the_block_still_being_written_survives(
    module_page: Page, text: str, selector: str
) -> None:
    """The last block is parsed anew on each update, but its DOM only grows: the text selected at
    its start stays selected while the rest arrives."""
    result = module_page.evaluate(
        """([text, selector]) => {
            const host = document.createElement('div');
            host.className = 'markdown';
            document.body.replaceChildren(host);
            const renderer = window.zeus.markdown.createReplyRenderer(host);
            let block = null;
            for (let end = 1; end <= text.length; end += 7) {
                renderer.update(text.slice(0, end));
                if (block === null && end > text.length / 3) {
                    block = host.querySelector(selector);
                    const walker = document.createTreeWalker(block, NodeFilter.SHOW_TEXT);
                    const first = walker.nextNode();
                    const range = document.createRange();
                    range.setStart(first, 0);
                    range.setEnd(first, 5);
                    getSelection().removeAllRanges();
                    getSelection().addRange(range);
                }
            }
            renderer.finish(text);
            return { same: host.querySelector(selector) === block, selected: getSelection().toString() };
        }""",
        [text, selector],
    )

    assert result["same"], "the block being written was drawn anew"
    assert result["selected"] == text.removeprefix("```python\n")[:5]


def test_a_selection_made_while_a_reply_with_footnotes_streams_survives(module_page: Page) -> None:
    """A person selects the first paragraph with the mouse while the reply is still arriving; the
    reply cites a footnote, so it is drawn again as a whole at its end: the paragraph (unchanged)
    keeps its node and the selection, the cited paragraph gains its link."""
    text = (
        "The first paragraph, to be selected.\n\nA claim[^1] in the second.\n\n"
        + "".join(f"Filler paragraph {n} with `code` and **bold**.\n\n" for n in range(40))
        + "[^1]: The source.\n"
    )
    module_page.evaluate(
        """(text) => {
            const host = document.createElement('div');
            host.className = 'markdown';
            host.id = 'render-host';
            document.body.replaceChildren(host);
            const renderer = window.zeus.markdown.createReplyRenderer(host);
            let end = 0;
            window.__streamDone = false;
            const timer = setInterval(() => {
                end = Math.min(text.length, end + 8);
                if (end < text.length) {
                    renderer.update(text.slice(0, end));
                } else {
                    clearInterval(timer);
                    renderer.finish(text);
                    window.__streamDone = true;
                }
            }, 15);
        }""",
        text,
    )
    first = module_page.locator("#render-host p", has_text="The first paragraph")
    # Final once a later block has begun on a complete line.
    expect(module_page.locator("#render-host p", has_text="Filler paragraph 2 ")).to_be_visible()
    first.evaluate("(node) => { window.__first = node; }")
    first.click(click_count=3)
    assert module_page.evaluate("getSelection().toString().trim()") == "The first paragraph, to be selected."
    assert module_page.evaluate("window.__streamDone") is False, "the stream ended before the selection"

    module_page.wait_for_function("() => window.__streamDone")

    assert module_page.evaluate("getSelection().toString().trim()") == "The first paragraph, to be selected."
    assert module_page.evaluate("document.querySelector('#render-host p') === window.__first")
    host = module_page.locator("#render-host")
    expect(host.locator("p", has_text="A claim").locator("sup.footnote-ref a")).to_have_count(1)
    expect(host.locator("section.footnotes li")).to_contain_text("The source.")
    expect(host.locator("p", has_text="Filler paragraph")).to_have_count(40)
    # Block for block what the whole reply gives when drawn at once.
    blocks = module_page.evaluate(
        """(text) => {
            const copy = document.createElement('div');
            copy.append(window.zeus.markdown.renderMarkdown(text));
            const drawn = document.querySelector('#render-host').children;
            const html = (nodes) => [...nodes].map((node) => node.outerHTML);
            return { drawn: html(drawn), whole: html(copy.children) };
        }""",
        text,
    )
    # Only the footnote ids differ (each drawing of a whole reply numbers its own).
    assert [re.sub(r"-r\d+-", "-", block) for block in blocks["drawn"]] == [
        re.sub(r"-r\d+-", "-", block) for block in blocks["whole"]
    ]


def test_streaming_work_does_not_grow_with_the_reply(module_page: Page) -> None:
    """Each update parses only the block being written: a 400-paragraph reply takes about as long
    per update at its end as at its start."""
    timings = module_page.evaluate(
        """() => {
            const host = document.createElement('div');
            document.body.replaceChildren(host);
            const renderer = window.zeus.markdown.createReplyRenderer(host);
            let text = '';
            const perUpdate = [];
            for (let paragraph = 0; paragraph < 400; paragraph += 1) {
                text += `Paragraph ${paragraph} with **bold** and _emphasis_ in it.\n\n`;
                const started = performance.now();
                renderer.update(text);
                perUpdate.push(performance.now() - started);
            }
            const mean = (values) => values.reduce((a, b) => a + b, 0) / values.length;
            return { early: mean(perUpdate.slice(10, 60)), late: mean(perUpdate.slice(-50)) };
        }"""
    )

    assert timings["late"] < max(4 * timings["early"], 2.0), timings
