"""The exit-code reference: the ExitCode values abq's commands return."""

from __future__ import annotations

from abqueue.cli import exits
from abqueue.cli.exits import ExitCode
from abqueue.reference.markdown import cell


def page() -> str:
    from abqueue.cli.main import COMMANDS

    lines = [
        "# Exit codes",
        "",
        "Every `abq` command exits with one of these:",
        "",
        "| code | meaning |",
        "| --- | --- |",
        *(f"| {int(c)} | {cell(c.meaning)} |" for c in exits.GENERAL),
        "",
        "Some commands give a code a meaning of their own:",
        "",
        "| command | code | meaning |",
        "| --- | --- | --- |",
    ]
    for module in sorted(COMMANDS, key=lambda m: m.__name__):
        command = "abq " + module.__name__.rsplit(".", 1)[1].removesuffix("_cmd")
        codes = sorted((v for v in vars(module).values() if isinstance(v, ExitCode)), key=int)
        lines += [f"| `{command}` | {int(c)} | {cell(c.meaning)} |" for c in codes]
    return "\n".join(lines) + "\n"
