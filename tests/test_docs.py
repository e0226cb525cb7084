"""The README and docs/ show commands a user types: each must still exist and take what it is given.

Read from the markdown's indented and fenced code blocks: `python -m stages.<module> ...` must name
a module that exists and whose argument parser accepts the arguments shown; `make <target>` a
target of the Makefile; `dvc exp run -S key=value` (and `--set key=value`) keys that the params
schema knows, with values it accepts; every relative link to a file of the repository must
resolve; and no page may point at a path outside the repository.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import repository_params

from stages import params as P

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def code_lines(page: Path) -> list[str]:
    """Lines of code blocks (4-space indented or fenced), continuation backslashes joined."""
    lines, fenced, out = page.read_text().splitlines(), False, []
    for line in lines:
        if line.startswith("```"):
            fenced = not fenced
            continue
        if fenced or line.startswith("    "):
            out.append(line.strip())
    joined: list[str] = []
    for line in out:
        if joined and joined[-1].endswith("\\"):
            joined[-1] = joined[-1][:-1] + " " + line
        else:
            joined.append(line)
    return [re.split(r"\s+#\s", line)[0].strip() for line in joined]  # without trailing comments


def commands(prefix: str) -> list[tuple[str, str]]:
    return [
        (page.name, line) for page in PAGES for line in code_lines(page) if line.startswith(prefix)
    ]


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces become hyphens."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_pages_exist_and_link_to_real_files_and_headings():
    assert (REPO / "docs").is_dir() and len(PAGES) > 1
    for page in PAGES:
        text = page.read_text()
        assert "../shared" not in text, f"{page.name} points outside the repository"
        for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", text):
            if "://" in target or target.startswith("mailto:"):
                continue
            linked = page.parent / target if target else page
            assert linked.exists(), f"{page.name} links to missing {target}"
            if anchor:
                assert anchor in anchors(linked), (
                    f"{page.name} links to {target}#{anchor}: no such heading"
                )


@pytest.mark.parametrize("page, line", commands("python -m stages."))
def test_module_commands_parse(page, line):
    words = shlex.split(line.replace("<", "").replace(">", ""))
    module, args = words[2], words[3:]
    assert (REPO / Path(*module.split("."))).with_suffix(".py").exists(), (
        f"{page}: no module {module}"
    )
    if not args or module.split(".")[1] in ("check", "download", "augment", "train", "evaluate"):
        return  # stages take no arguments; running them is what the other tests do
    # argparse's own check: the arguments shown parse (then --help stops before any work)
    code = (
        f"import sys; sys.argv = {[module, *args, '--help']!r}; import runpy; "
        f"runpy.run_module({module!r}, run_name='__main__')"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, f"{page}: `{line}` does not parse: {result.stderr[-500:]}"


@pytest.mark.parametrize("page, line", commands("make "))
def test_make_targets_exist(page, line):
    targets = set(re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), re.M))
    target = line.split()[1]
    if "=" in target:  # make VAR=value target
        target = next(w for w in line.split()[1:] if "=" not in w)
    assert target in targets, f"{page}: make {target} is not a Makefile target"


def param_changes(line: str) -> dict:
    words = shlex.split(line)
    changes = {}
    for flag, value in zip(words, words[1:]):
        if flag in ("-S", "--set") and "=" in value:
            key, _, raw = value.partition("=")
            raw = re.sub(r"<[^>]*>", "x", raw)  # a placeholder: runs:/<run id>/model
            # DVC's grid syntax: one experiment per value; [a,b] is one value, a list
            if "," in raw and flag == "-S" and not raw.startswith("["):
                raw = raw.split(",")[0]
            changes[key.lstrip("+")] = yaml.safe_load(raw)
    return changes


@pytest.mark.parametrize(
    "page, line",
    [
        c
        for c in commands("dvc exp run") + commands("python -m stages.experiments")
        if param_changes(c[1])
    ],
)
def test_param_changes_shown_are_valid(page, line):
    raw = repository_params()
    changes = param_changes(line)
    if "data.source" in changes and "data.sha256" not in changes:
        changes["data.sha256"] = None  # another source than the bundled file: its own hash or none
    P.parse(P.with_changes(raw, changes))


CODE = [REPO / "Makefile", *REPO.glob(".ci/*"), *REPO.glob("**/*.py"), *REPO.glob("**/*.yaml")]


def test_no_placeholder_is_left_in_the_docs():
    """A name in CAPITALS_WITH_UNDERSCORES in a page is an environment, make or code variable the
    code uses, never a placeholder left where a command belongs; no template is left unfilled."""
    code = "\n".join(p.read_text() for p in CODE if ".venv" not in p.parts and p.is_file())
    for page in PAGES:
        text = page.read_text()
        unknown = sorted(
            set(re.findall(r"\b[A-Z][A-Z0-9]*_[A-Z0-9_]{2,}\b", text))
            - set(re.findall(r"\b[A-Z][A-Z0-9]*_[A-Z0-9_]{2,}\b", code))
        )
        assert not unknown, f"{page.name}: placeholders? {unknown}"
        assert "{{" not in text, page.name  # an unfilled Jinja or Go template
