"""The exit-code reference: the ExitCode values abq's commands return."""

from __future__ import annotations

from abqueue.cli import exits
from abqueue.cli.exits import ExitCode
from abqueue.reference.markdown import cell


def page() -> str:
    from abqueue.cli import batch_cmd, demo_cmd, kafka_cmd, rollout_cmd, schemas_cmd, submit_cmd

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
    for command, module in (
        ("abq batch", batch_cmd),
        ("abq demo", demo_cmd),
        ("abq kafka", kafka_cmd),
        ("abq rollout", rollout_cmd),
        ("abq schemas", schemas_cmd),
        ("abq submit", submit_cmd),
    ):
        codes = sorted((v for v in vars(module).values() if isinstance(v, ExitCode)), key=int)
        lines += [f"| `{command}` | {int(c)} | {cell(c.meaning)} |" for c in codes]
    return "\n".join(lines) + "\n"
