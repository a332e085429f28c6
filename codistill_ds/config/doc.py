"""The README's configuration reference, generated from the config's own docstrings.

`config.py` documents every field in a string right under it; this module turns those into the
README table (`python -m codistill_ds.config.doc`), and a test checks that the README holds
exactly this table, so a field added, renamed or re-documented cannot leave the README behind.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import textwrap

from codistill_ds.config import Config

START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def field_docs(cls: type) -> dict[str, str]:
    """The string literal under each field of a dataclass, whitespace collapsed."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs: dict[str, str] = {}
    for node, nxt in itertools.pairwise(body):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _rows(obj: object, prefix: str) -> list[str]:
    rows, docs = [], field_docs(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            rows += _rows(value, f"{prefix}{f.name}.")
            continue
        doc = docs.get(f.name, "").replace("|", "\\|")
        rows.append(f"| `{prefix}{f.name}` | `{value!r}` | {doc} |")
    return rows


def reference_table() -> str:
    """The markdown table, with the markers the README keeps around it."""
    lines = [START, "| field | default | meaning |", "|---|---|---|", *_rows(Config(), ""), END]
    return "\n".join(lines)


if __name__ == "__main__":
    print(reference_table())
