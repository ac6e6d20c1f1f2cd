"""Runs the recipes of a Markdown page: its fenced blocks marked `{.bash .recipe}` or `{.python .recipe}`,
in order, as one shell script (so a variable set or a process started in one block is there in the
next), and checks each `{.text .expect}` block against the output of the recipe before it, by shape:
every expected line must appear in that output, in order, with numbers and hex ids free to differ
(or verbatim, in a block also marked `.exact`).

pytest-markdown-docs runs a page's Python blocks one by one inside the test process; a recipe is a
sequence whose Python steps need the broker, workers and gateway its shell steps started, so the
shell and Python steps run here, in one script, in the order a reader runs them."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

FENCE = re.compile(r"^```\{(?P<attrs>[^}]*)\}\s*$")
SNIPPET = re.compile(r'^--8<-- "(?P<path>[^"]+)"$', re.M)  # pymdownx.snippets' include, as the site shows it
REPO = Path(__file__).resolve().parent.parent
MARKER = "::recipe-block::"


@dataclass
class Block:
    kind: str  # bash, python, expect
    line: int  # where the block starts in the page (1-based), for the failure message
    text: str
    expected: list[tuple[str, bool]] = field(
        default_factory=list
    )  # for a recipe: (line, exact) of the expect blocks after it


def blocks(page: Path) -> list[Block]:
    """The page's recipes, each with the expect blocks that follow it."""
    out: list[Block] = []
    lines = page.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        classes = set(m["attrs"].split())
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        text = SNIPPET.sub(lambda m: (REPO / m["path"]).read_text().rstrip("\n"), "\n".join(lines[i + 1 : end]))
        if ".recipe" in classes:
            kind = "python" if ".python" in classes else "bash"
            out.append(Block(kind, i + 1, text))
        elif ".expect" in classes:
            if not out:
                raise ValueError(f"{page}:{i + 1}: an expect block before any recipe")
            out[-1].expected += [(line, ".exact" in classes) for line in text.splitlines()]
        i = end + 1
    return out


def script(recipes: list[Block]) -> str:
    parts = ["set -euo pipefail"]
    for n, b in enumerate(recipes):
        parts.append(f"printf '\\n%s\\n' {shlex.quote(f'{MARKER}{n}')}")
        if b.kind == "python":
            parts.append(f"python - <<'ABQ_RECIPE_PY'\n{b.text}\nABQ_RECIPE_PY")
        else:
            parts.append(b.text)
    return "\n".join(parts) + "\n"


def shape(line: str) -> str:
    line = re.sub(r"\b[0-9a-f]{8,}\b", "H", line)
    line = re.sub(r"\d+(\.\d+)?", "N", line)
    return " ".join(line.split())


def check_shape(expected: list[str] | list[tuple[str, bool]], output: str) -> str | None:
    """None if every expected line appears in the output in order, by shape (or verbatim where marked
    exact: `{.text .expect .exact}`, for output that does not vary); else the first missing line."""
    got = iter(output.splitlines())
    for item in expected:
        want, exact = item if isinstance(item, tuple) else (item, False)
        norm = (lambda line: line.rstrip()) if exact else shape
        w = norm(want)
        if not w:
            continue
        if not any(w == norm(g) for g in got):
            return want
    return None


def run(page: Path, cwd: Path, env: dict[str, str], timeout_s: float) -> None:
    """Run the page's recipes in `cwd`; raise AssertionError naming the block that failed."""
    recipes = blocks(page)
    assert recipes, f"{page} has no recipe blocks"
    log = cwd / "recipe-output.log"
    path = cwd / "recipe.sh"
    path.write_text(script(recipes))
    env = {**env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"}
    with open(log, "wb") as out:  # a file, not a pipe: background commands keep their stdout open
        proc = subprocess.Popen(
            ["bash", str(path)], cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            try:  # what the page left running: its background commands share the script's session
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
    text = log.read_text(errors="replace")
    outputs = re.split(rf"^{re.escape(MARKER)}(\d+)$", text, flags=re.M)
    by_block = {int(outputs[k]): outputs[k + 1] for k in range(1, len(outputs) - 1, 2)}
    last = max(by_block, default=0)
    if code != 0:
        b = recipes[last]
        why = "timed out" if code is None else f"exited {code}"
        raise AssertionError(
            f"{page.name}:{b.line}: the recipe {why}:\n{b.text}\n--- its output ---\n{by_block.get(last, '')[-4000:]}"
        )
    for n, b in enumerate(recipes):
        if b.expected and (missing := check_shape(b.expected, by_block.get(n, ""))) is not None:
            raise AssertionError(
                f"{page.name}:{b.line}: the output lacks the documented line {missing!r}:\n{by_block.get(n, '')[-4000:]}"
            )
