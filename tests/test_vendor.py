"""The vendored front-end libraries (app/static/vendor, written by `make vendor`) are exactly the
npm packages of package-lock.json: every file matches vendor/SHA256SUMS, nothing unlisted is
served, the versions are pinned exactly, and the pages load nothing from another host."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STATIC = ROOT / "app" / "static"
VENDOR = STATIC / "vendor"


def listed_sums() -> dict[str, str]:
    sums = {}
    for line in (VENDOR / "SHA256SUMS").read_text().splitlines():
        if line and not line.startswith("#"):
            digest, path = line.split("  ", 1)
            sums[path] = digest
    return sums


def test_every_vendored_file_matches_its_checksum_and_nothing_else_is_there() -> None:
    sums = listed_sums()
    present = {
        str(path.relative_to(VENDOR))
        for path in VENDOR.rglob("*")
        if path.is_file() and path.name != "SHA256SUMS"
    }
    assert present == set(sums), f"unlisted: {present - set(sums)}, missing: {set(sums) - present}"
    changed = [
        path
        for path, digest in sums.items()
        if hashlib.sha256((VENDOR / path).read_bytes()).hexdigest() != digest
    ]
    assert changed == [], f"vendored files edited by hand (run `make vendor`): {changed}"


def test_versions_are_pinned_exactly_and_match_the_lockfile() -> None:
    package = json.loads((ROOT / "package.json").read_text())
    lock = json.loads((ROOT / "package-lock.json").read_text())
    header = re.findall(r"^# (.+)@(\d[^\s]*)$", (VENDOR / "SHA256SUMS").read_text(), re.M)
    for name, version in package["dependencies"].items():
        assert re.fullmatch(r"\d+\.\d+\.\d+", version), f"{name} is not pinned exactly: {version}"
        locked = lock["packages"][f"node_modules/{name}"]
        assert locked["version"] == version
        assert locked["integrity"].startswith("sha512-"), f"{name} has no integrity hash in the lockfile"
    assert dict(header) == package["dependencies"]


def test_pages_load_nothing_from_other_hosts() -> None:
    for page in [*STATIC.glob("*.html"), *STATIC.glob("js/*.js"), *STATIC.glob("css/*.css")]:
        text = page.read_text()
        assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text), page
        assert not re.search(r"""(import|from)\s*\(?\s*["'](https?:)?//""", text), page
        assert not re.search(r"url\(\s*[\"']?(https?:)?//", text), page


def test_the_page_registers_exactly_the_vendored_grammars() -> None:
    """app/static/js/highlight.js imports one file per name of its LANGUAGES; a name without its
    vendored file breaks the chat page's module graph, a vendored file without its name is dead
    weight."""
    source = (STATIC / "js" / "highlight.js").read_text()
    listed = re.search(r"const LANGUAGES = \[(.*?)\];", source, re.S)
    assert listed, "LANGUAGES not found in highlight.js"
    names = set(re.findall(r'"([\w-]+)"', listed.group(1)))
    vendored = {
        path.name.removesuffix(".min.js") for path in (VENDOR / "highlight" / "languages").glob("*.min.js")
    }
    assert names == vendored, f"only in highlight.js: {names - vendored}, only vendored: {vendored - names}"
