"""The README is a user's document that stays true: its quick start reaches a prediction on a user's own folder, every
command it and the docs pages show parses, and every link between them resolves."""
import csv
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from gcvimoe.cli import build_parser, main
from helpers import CLASSES, make_image_folder

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]


def code_blocks(text, language="bash"):
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def commands(block):
    """The block's commands: comments dropped, continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", block)
    lines = (line.split(" #")[0].strip() for line in joined.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def quick_start():
    section = README.read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return commands(code_blocks(section)[0])


def test_quick_start_reaches_a_prediction_on_a_users_folder(tmp_path, monkeypatch, one_thread):
    """What a fresh clone types, in order. ``make demo`` and the venv are the Makefile's and pyproject's part (checked
    here without installing); the commands after them run on a generated folder named as the user's, for 1 epoch."""
    steps = quick_start()
    assert steps[:2] == ["make demo", "source .venv/bin/activate"], steps
    # -B: the dry run lists the venv step even where this checkout's .venv is already built (as under `make test`)
    dry_run = subprocess.run(["make", "-n", "-B", "demo"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "-m venv .venv" in dry_run and ".venv/bin/python -m gcvimoe demo" in dry_run, dry_run
    assert 'gcvimoe = "gcvimoe.cli:main"' in (ROOT / "pyproject.toml").read_text()  # .venv/bin/gcvimoe

    monkeypatch.chdir(tmp_path)
    gcvimoe_steps = [shlex.split(step) for step in steps[2:]]
    assert [argv[:2] for argv in gcvimoe_steps] == [["gcvimoe", "train"], ["gcvimoe", "predict"]], steps
    folder = gcvimoe_steps[0][gcvimoe_steps[0].index("--data-dir") + 1]
    make_image_folder(tmp_path / folder, train_per_class=4, val_per_class=1)
    train_argv = gcvimoe_steps[0][1:]
    train_argv[train_argv.index("--epochs") + 1] = "1"
    assert main([*train_argv, "--workers", "0", "--threads", "1", "--no-tensorboard"]) == 0
    assert main(gcvimoe_steps[1][1:]) == 0
    results = gcvimoe_steps[1][gcvimoe_steps[1].index("--results-file") + 1]
    with open(tmp_path / results) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(CLASSES)  # one per val image


def _shown_gcvimoe_commands():
    for page in PAGES:
        for block in code_blocks(page.read_text()):
            for line in commands(block):
                argv = shlex.split(line)
                if "gcvimoe" in argv and "..." not in line and "[" not in line:
                    yield page.name, argv[argv.index("gcvimoe") + 1:]


@pytest.mark.parametrize("page, argv", list(_shown_gcvimoe_commands()), ids=lambda v: v if isinstance(v, str) else
                         " ".join(v[:2]))
def test_every_shown_command_parses(page, argv):
    """Every subcommand and flag the README and the docs show exists (parsed, not run)."""
    try:
        build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"{page}: gcvimoe {' '.join(argv)} does not parse")


def _anchor(heading):
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_readme_is_short_and_every_link_resolves():
    assert len(README.read_text().splitlines()) <= 250
    anchors = {page: {_anchor(h) for h in re.findall(r"^#+ (.*)$", page.read_text(), flags=re.M)} for page in PAGES}
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if target.startswith("http"):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            assert linked.exists(), f"{page.name}: {target}"
            if anchor:
                assert anchor in anchors[linked], f"{page.name}: {target}"
    linked_from_readme = set(re.findall(r"\]\(docs/([\w-]+\.md)", README.read_text()))
    assert linked_from_readme == {page.name for page in PAGES[1:]}
