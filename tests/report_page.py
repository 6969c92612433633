"""A page `dbl report` wrote, read back as an HTML parser reads it, for the report tests.

Import by name (`from tests.report_page import Page`)."""

from __future__ import annotations

from html.parser import HTMLParser


class Page(HTMLParser):
    """The parts of a page the tests look at: every tag with its attributes, and the text."""

    def __init__(self, text: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)

    def images(self, css: str) -> list[dict]:
        return [a for t, a in self.tags if t == "img" and css in a.get("class", "").split()]
