"""Markdown helpers shared by the reference pages."""

from __future__ import annotations


def cell(text: str) -> str:
    """Text made safe for one cell of a Markdown table: one line, no stray pipes or tags."""
    return " ".join(text.split()).replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def code(text: object) -> str:
    """A value as inline code in a table cell (YAML's spelling of booleans)."""
    shown = {True: "true", False: "false"}.get(text, text) if isinstance(text, bool) else text
    return "`" + str(shown).replace("|", "\\|") + "`"
