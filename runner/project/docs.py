"""The project-file reference of the README, made from the schema (a test keeps the two equal).

python -m runner.project.docs    # print the reference tables
"""

from __future__ import annotations

from dataclasses import MISSING

from runner.project import schema


def _default(f) -> str:
    if f.default is not MISSING:
        value = f.default
    elif f.default_factory is not MISSING:
        value = f.default_factory()
    else:
        return "required"
    if value is None:
        return "—"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f'`"{value}"`'
    if isinstance(value, list):
        return "`[" + ", ".join(f'"{v}"' if isinstance(v, str) else str(v) for v in value) + "]`"
    return f"`{value}`"


def tables() -> dict[str, type]:
    """Every project-file table, as the README names it, with its dataclass: the fixed ones, then each
    registered step kind's."""
    from runner import steps

    result = dict(schema.TABLES)
    result.update({f"{kind.table}.<name>": kind.spec for kind in steps.kinds() if kind.table})
    return result


def reference_markdown() -> str:
    """One table per project-file table: key, default, meaning (with choices)."""
    parts = []
    for table, cls in tables().items():
        rows = [f"### [{table}]", "", "| key | default | meaning |", "|---|---|---|"]
        for f in schema.keys_of(cls):
            doc = f.metadata["doc"]
            if f.metadata.get("choices"):
                doc += ": " + ", ".join(f"`{c}`" for c in f.metadata["choices"])
            if not f.metadata.get("fingerprint", True):
                doc += " *(not fingerprinted: changing it rebuilds nothing)*"
            rows.append(f"| `{f.name}` | {_default(f)} | {doc} |")
        parts.append("\n".join(rows))
    return "\n\n".join(parts) + "\n"


if __name__ == "__main__":
    print(reference_markdown(), end="")
