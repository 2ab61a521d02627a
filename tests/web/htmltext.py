"""Read text out of the app's HTML by element id, and find things a strict CSP would block."""

from __future__ import annotations

import re
from html.parser import HTMLParser

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class _Collector(HTMLParser):
    """Collects each id'd element's text, every tag's attributes, and inline script/style bodies."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, str | None]] = []
        self.texts: dict[str, list[str]] = {}
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.inline_code: list[str] = []
        self._in_code: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag in ("script", "style") and not a.get("src"):
            self._in_code = tag
        if tag in VOID:
            return
        self.stack.append((tag, a.get("id")))
        if a.get("id"):
            self.texts.setdefault(str(a["id"]), [])

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_endtag(self, tag: str) -> None:
        if self._in_code == tag:
            self._in_code = None
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i][0] == tag:
                del self.stack[i:]
                break

    def handle_data(self, data: str) -> None:
        if self._in_code and data.strip():
            self.inline_code.append(data)
        for _tag, ident in self.stack:
            if ident:
                self.texts[ident].append(data)


def parse(html: str) -> _Collector:
    """Parse a page or fragment."""
    c = _Collector()
    c.feed(html)
    c.close()
    return c


def text_by_id(html: str, ident: str) -> str:
    """The whitespace-normalised text of the element with this id (AssertionError when absent)."""
    texts = parse(html).texts
    assert ident in texts, f"no element with id={ident!r}"
    return re.sub(r"\s+", " ", "".join(texts[ident])).strip()


def attr_of(html: str, ident: str, attr: str) -> str | None:
    """An attribute of the element with this id."""
    for _tag, a in parse(html).tags:
        if a.get("id") == ident:
            return a.get(attr)
    raise AssertionError(f"no element with id={ident!r}")


def csp_violations(html: str) -> list[str]:
    """Inline scripts/styles, style= and on*= attributes: what `default-src 'self'` would block."""
    c = parse(html)
    found = [f"inline <script>/<style>: {code[:60]!r}" for code in c.inline_code]
    for tag, a in c.tags:
        for name in a:
            if name == "style" or name.startswith("on"):
                found.append(f"<{tag} {name}=...>")
        if tag == "script" and (a.get("src") or "").startswith(("http:", "https:", "//")):
            found.append(f"external script {a['src']}")
        if tag == "link" and (a.get("href") or "").startswith(("http:", "https:", "//")):
            found.append(f"external link {a['href']}")
    return found
