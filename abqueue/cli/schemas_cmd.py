"""`abq schemas export|check`: JSON Schema files for producers written in other languages."""

from __future__ import annotations

import argparse
from pathlib import Path

from abqueue.cli.exits import ExitCode

STALE = ExitCode(1, "`check`: a JSON Schema file differs from the models; `abq schemas export` rewrites them")


def register(sub) -> None:
    p = sub.add_parser("schemas", help="export or check the JSON Schema files of the message contracts")
    ssub = p.add_subparsers(dest="schemas_cmd", required=True, metavar="{export,check}")
    for name, help_ in (
        ("export", "write the JSON Schema files"),
        ("check", "exit 1 if the files differ from the models"),
    ):
        sp = ssub.add_parser(name, help=help_, description=help_)
        sp.add_argument(
            "--dir", type=Path, default=None, help="target directory (default: the schemas package's jsonschema/)"
        )
        sp.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from schemas.export import check, export

    if args.schemas_cmd == "export":
        for path in export(args.dir):
            print(path)
        return 0
    stale = check(args.dir)
    for path in stale:
        print(f"out of date: {path}; run `abq schemas export`")
    return STALE if stale else 0
