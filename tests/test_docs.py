"""The documentation stays true: the site builds strictly, the generated references match the code,
and the recipes run as written against a real broker (tests/recipes.py)."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import recipes

from abqueue.localkafka.broker import free_port

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"


def _clean_env() -> dict[str, str]:
    """The environment without abqueue's and Kafka's variables, which change defaults the pages show."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("ABQ_", "KAFKA_"))}


def test_the_site_builds_strictly_with_every_page_in_the_nav_and_no_broken_link(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO, capture_output=True, text=True, timeout=120, env={**_clean_env(), "NO_MKDOCS_2_WARNING": "1"},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]


def test_the_generated_references_match_the_code():
    r = subprocess.run(
        [sys.executable, "-m", "abqueue.reference", "--check", "--out", str(DOCS / "reference")],
        cwd=REPO, capture_output=True, text=True, timeout=120,  # in this shell's environment: render() ignores ABQ_*
    )  # fmt: skip
    assert r.returncode == 0, r.stderr


def test_the_references_are_complete():
    from abqueue.reference import render
    from schemas.experiment import config_keys

    pages = render()
    config = pages["config.md"]
    for key in config_keys():  # every key of every model, with its description
        assert re.search(rf"^\| `{key}` \|.*\| [^|\s][^|]* \|$", config, re.M), f"config key {key} lacks a description"
    code = "\n".join(
        p.read_text() for d in ("abqueue", "workers", "producers", "schemas") for p in (REPO / d).rglob("*.py")
    )
    for var in set(re.findall(r"""["'](ABQ_[A-Z0-9_]+)["']""", code)) - {"ABQ_"}:
        assert f"`{var}`" in config, f"{var} is read by the code but not in the configuration reference"
    cli = pages["cli.md"]
    from abqueue.cli.main import build_parser

    def walk(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue  # every command has -h
            for flag in action.option_strings:
                assert f"`{flag}" in cli, f"{' '.join(path)} {flag} is not in the CLI reference"
            for name, sub in action.choices.items() if isinstance(action, argparse._SubParsersAction) else ():
                assert f"## `{' '.join([*path, name])}`" in cli, (
                    f"{' '.join([*path, name])} is not in the CLI reference"
                )
                walk(sub, [*path, name])

    walk(build_parser(), ["abq"])
    for metric in ("abq_requests_total", "abq_hook_seconds", "abq_kv_cache_usage_ratio", "abq_gateway_requests_total"):
        assert f"`{metric}`" in pages["metrics.md"]


def test_the_readme_is_short_and_links_into_the_docs():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    for link in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (REPO / link).is_file(), f"README links to {link}, which does not exist"
    # Its code is what a tested page runs: each Python block is part of a recipe.
    tested = "\n".join(b.text for page in RECIPE_PAGES for b in recipes.blocks(DOCS / page))
    for block in re.findall(r"```python\n(.*?)```", readme, re.S):
        assert block.strip() in tested, f"the README's Python block is not run by any page:\n{block}"


def test_every_example_header_names_commands_that_parse():
    """The commands in the examples' header comments are real: abq's parser takes each."""
    from abqueue.cli.main import build_parser

    parser = build_parser()
    for example in (REPO / "examples").glob("*.yaml"):
        for line in example.read_text().splitlines():
            if not line.startswith("#"):
                continue
            for part in line.split("&&"):
                if "abq " in part:
                    command = part[part.index("abq ") + 4 :].split()
                    parser.parse_args(command)  # argparse exits (failing the test) on anything it does not take


RECIPE_PAGES = sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md") if recipes.blocks(p))


@pytest.mark.slow
@pytest.mark.parametrize("page", RECIPE_PAGES)
def test_the_page_runs_as_written(page, tmp_path):
    """Every recipe of the page, in order, from a directory holding a copy of examples/, on a broker
    of its own where the page starts one (`abq kafka up`: on ABQ_KAFKA_PORT, a free port here)."""
    k8s = "abq k8s up" in (DOCS / page).read_text()
    if k8s and shutil.which("go") is None:
        pytest.skip("the page starts the control plane, which is built from Go modules: no Go toolchain on PATH")
    shutil.copytree(REPO / "examples", tmp_path / "examples")
    port = free_port()
    env = {**_clean_env(), "ABQ_KAFKA_PORT": str(port), "ABQ_BOOTSTRAP_SERVERS": f"127.0.0.1:{port}"}
    env["ABQ_K8S_DIR"] = str(tmp_path / "k8s")  # a control plane of its own, where the page starts one
    if "ABQ_CACHE_DIR" in os.environ:
        env["ABQ_CACHE_DIR"] = os.environ["ABQ_CACHE_DIR"]
    abq = [sys.executable, "-m", "abqueue.cli.main"]
    try:
        recipes.run(DOCS / page, tmp_path, env, timeout_s=280)
    finally:
        if k8s:  # its components lead sessions of their own: the recipe's end does not stop them
            subprocess.run([*abq, "k8s", "down"], env=env, capture_output=True, timeout=60)
        subprocess.run([*abq, "kafka", "reset"], env=env, capture_output=True, timeout=60)


def test_the_pages_a_newcomer_follows_are_tested():
    for page in ("getting-started.md", "guides/gateway.md", "guides/batch.md", "guides/send-requests.md",
                 "guides/kubernetes.md", "guides/tuning-keda.md", "concepts/scaling.md"):  # fmt: skip
        assert page in RECIPE_PAGES, f"{page} has no tested recipe"


def test_the_recipe_runner_fails_on_a_failing_step_and_on_output_of_another_shape(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        '```{.bash .recipe}\nX=7\necho "took 1.5s for 40 lines"\n```\n\n```{.text .expect}\ntook 9.9s for 12 lines\n```\n\n'
        "```{.python .recipe}\nimport os\nprint('from python', os.environ['HOME'] != '')\n```\n\n"
        '```{.bash .recipe}\necho "X is $X"\n```\n\n```{.text .expect}\nX is 1\n```\n'
    )
    recipes.run(page, tmp_path, dict(os.environ), timeout_s=60)  # numbers may differ; a variable carries over
    page.write_text(page.read_text().replace("took 9.9s for 12 lines", "took 9.9s for 12 requests"))
    with pytest.raises(AssertionError, match="lacks the documented line 'took 9.9s for 12 requests'"):
        recipes.run(page, tmp_path, dict(os.environ), timeout_s=60)
    page.write_text("```{.bash .recipe}\ntrue\n```\n\n```{.bash .recipe}\nfalse\necho never\n```\n")
    with pytest.raises(AssertionError, match=r"page.md:5: the recipe exited 1"):
        recipes.run(page, tmp_path, dict(os.environ), timeout_s=60)
