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


def record_as_built(lock_path, project_dir, *files) -> None:
    """Record `files` (outputs of steps in the lockfile at `lock_path`) as they are now, as if the build
    that made them had written them so: the report shows what a lockfile records, and an odd dbl.json it
    records is what these tests need (one it does not record is another build's, and shown as such)."""
    import hashlib

    from runner import lockfile

    lock = lockfile.read(lock_path)
    for path in files:
        rel = path.relative_to(project_dir).as_posix()
        record = next(r for r in lock.values() if rel in r.get("outputs", {}))
        record["outputs"][rel] = {
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "size": path.stat().st_size,
        }
    lockfile.write(lock_path, lock)
