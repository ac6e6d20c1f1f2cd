"""The CLI reference: every command and option of `abq`, walked from its argparse parsers."""

from __future__ import annotations

import argparse

from abqueue.reference.markdown import cell

WIDTH = 100  # usage lines wrap here, whatever the terminal of whoever generates the page


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            return [(name, helps.get(name, ""), sub) for name, sub in action.choices.items()]
    return []


def _option(action: argparse.Action, formatter: argparse.HelpFormatter) -> str:
    if action.option_strings:
        names = ", ".join(f"`{s}`" for s in action.option_strings)
        if action.nargs != 0:
            names += f" `{formatter._format_args(action, formatter._get_default_metavar_for_optional(action))}`"
    else:
        names = f"`{formatter._format_args(action, formatter._get_default_metavar_for_positional(action))}`"
    help_ = formatter._expand_help(action) if action.help else ""
    notes = []
    if action.required and action.option_strings:
        notes.append("required")
    if action.choices is not None and not isinstance(action, argparse._SubParsersAction):
        notes.append("one of " + ", ".join(f"`{c}`" for c in action.choices))
    default = action.default
    if (
        action.option_strings
        and action.nargs != 0
        and default not in (None, argparse.SUPPRESS, [], "")
        and "default" not in help_
        and not isinstance(default, bool)
    ):
        notes.append(f"default `{default}`")
    return f"| {names} | {cell(help_)}{' (' + '; '.join(notes) + ')' if notes else ''} |"


def _section(path: list[str], help_: str, parser: argparse.ArgumentParser, out: list[str]) -> None:
    parser.formatter_class = lambda prog: argparse.HelpFormatter(prog, width=WIDTH)
    formatter = parser._get_formatter()
    level = "#" * min(len(path) + 1, 4)
    out += [f"{level} `{' '.join(path)}`", ""]
    about = parser.description or help_
    if about:
        out += [cell(about), ""]
    out += ["```text", parser.format_usage().strip(), "```", ""]
    rows = [
        _option(a, formatter)
        for a in parser._actions
        if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))
    ]
    if rows:
        out += ["| option | what |", "| --- | --- |", *rows, ""]
    for name, sub_help, sub in _subcommands(parser):
        _section([*path, name], sub_help, sub, out)


def page() -> str:
    from abqueue.cli.main import build_parser

    out = [
        "# CLI",
        "",
        "Every command and option of `abq`, as `abq COMMAND --help` prints them. Options that name an "
        "environment variable read it when the flag is absent; the Kafka connection options are the same for "
        "every command (see [Configuration](config.md#environment)). Exit codes: [Exit codes](exit-codes.md).",
        "",
    ]
    _section(["abq"], "", build_parser(), out)
    return "\n".join(out).rstrip() + "\n"
