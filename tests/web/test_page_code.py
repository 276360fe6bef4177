"""The pages' own code in a real browser, without the API: markdown rendering, SSE parsing, highlighting.

The renderer is where model output meets the DOM, so it is tested here with hostile input directly;
test_chat.py checks the same through the whole stack.
"""

from __future__ import annotations

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
                highlight: await import('/js/highlight.js'),
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
    assert module_page.locator("#render-host .tok-keyword").first.inner_text() == "print" or (
        module_page.locator("#render-host .tok-function").first.inner_text() == "print"
    )
    assert module_page.locator("#render-host .tok-comment").inner_text() == "# greet"
    assert module_page.locator("#render-host .tok-string").inner_text() == "'hi'"


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
