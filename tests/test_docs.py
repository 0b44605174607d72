"""The documentation (README.md and docs/*.md) against the repository and the real command line (issue 21).

Fast and training-free: every relative link resolves, the README's first screen stays short, and every ``uge``
command shown in a shell code block parses with ``uge.cli.build_parser()`` (argparse errors exit 2).
"""
from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from uge.errors import ConfigError

from uge.cli import build_parser
from uge.standing import STANDING

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FIRST_SCREEN_LINES = 60
SHELL_FENCES = {"", "bash", "sh", "shell", "console"}  # code blocks whose `uge` lines are commands
SEPARATORS = {"&&", "||", ";", "|", "&"}
EXAMPLE_VARIABLES = {"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "4"}  # what a scheduler would set

_FENCE = re.compile(r"^\s*(```+|~~~+)\s*([\w+-]*)")
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _split_fences(text: str) -> tuple[list[str], list[tuple[str, int, str]]]:
    """The page's prose lines (code blocks blanked, so line numbers hold) and its code lines
    as (fence info, 1-based line number, text)."""
    prose, code = [], []
    fence, info = None, ""
    for n, line in enumerate(text.splitlines(), 1):
        m = _FENCE.match(line)
        if fence is None and m:
            fence, info = m.group(1), m.group(2).lower()
            prose.append("")
        elif fence is not None and line.strip().startswith(fence[0] * len(fence)) and not line.strip().strip(fence[0]):
            fence = None
            prose.append("")
        elif fence is not None:
            code.append((info, n, line))
            prose.append("")
        else:
            prose.append(line)
    return prose, code


def _links(page: Path) -> list[tuple[int, str]]:
    """Every markdown link target outside code, with its line number."""
    prose, _ = _split_fences(page.read_text(encoding="utf-8"))
    return [(n, m.group(1)) for n, line in enumerate(prose, 1)
            for m in _LINK.finditer(_INLINE_CODE.sub("", line))]


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lstrip("#").strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    prose, _ = _split_fences(page.read_text(encoding="utf-8"))
    return {_slug(line) for line in prose if re.match(r"^#{1,6}\s", line)}


LINKS = [(page, n, target) for page in PAGES for n, target in _links(page)
         if not re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE)]  # http(s), mailto: not checked here


def test_pages_exist():
    assert (ROOT / "README.md").is_file() and len(PAGES) > 1, "docs/*.md pages are missing"


@pytest.mark.parametrize("page,line,target", LINKS, ids=[f"{_rel(p)}:{n}:{t}" for p, n, t in LINKS])
def test_relative_link_resolves(page, line, target):
    path, _, fragment = target.partition("#")
    if not path:  # a pure #anchor into the same page
        assert _slug(fragment) in _anchors(page) or fragment in _anchors(page), \
            f"{_rel(page)}:{line}: no heading for #{fragment}"
        return
    resolved = (page.parent / path).resolve()
    assert resolved.exists(), f"{_rel(page)}:{line}: link target {target!r} does not exist ({resolved})"
    if fragment and resolved.suffix == ".md":
        assert fragment in _anchors(resolved), f"{_rel(page)}:{line}: {path} has no heading for #{fragment}"


def test_readme_first_screen():
    """At most 60 lines before the README's first link into docs/, and the newcomer's two commands in them."""
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    first = next((i for i, line in enumerate(lines) if re.search(r"\]\((\./)?docs/", line)), None)
    assert first is not None, "README.md links to no docs/ page"
    assert first <= FIRST_SCREEN_LINES, f"README.md has {first} lines before its first docs/ link"
    screen = "\n".join(lines[:first])
    assert re.search(r"^pip install -e \. && uge demo\b", screen, re.MULTILINE), \
        "the install + demo line left the first screen"
    assert re.search(r'^pip install -e "\.\[test\]" && python -m pytest\b', screen, re.MULTILINE), \
        "the test command (CI runs `python -m pytest`) left the first screen"


def _uge_argv(command: str) -> list[str] | None:
    """The first `uge ...` command of a shell line, as argv (comments, other commands and VAR=value prefixes
    dropped; the scheduler's variables of EXAMPLE_VARIABLES replaced by example values); None when the line
    runs no uge command."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    segment: list[str] = []
    for token in [*lexer, ";"]:
        if token not in SEPARATORS:
            segment.append(token)
            continue
        while segment and re.match(r"^[A-Za-z_]\w*=", segment[0]):  # OMP_NUM_THREADS=1 uge ...
            segment.pop(0)
        if segment and segment[0] == "uge":
            return [re.sub(r"\$\{?(\w+)\}?", lambda m: EXAMPLE_VARIABLES.get(m.group(1), m.group(0)), t)
                    for t in segment]
        segment = []
    return None


def _commands() -> list[tuple[Path, int, list[str]]]:
    found = []
    for page in PAGES:
        _, code = _split_fences(page.read_text(encoding="utf-8"))
        pending, start = "", 0
        for info, n, line in code:
            if info not in SHELL_FENCES:
                continue
            if not pending:
                start = n
            if line.rstrip().endswith("\\"):  # a continued line: join it with the next
                pending += line.rstrip()[:-1] + " "
                continue
            argv = _uge_argv(pending + line)
            pending = ""
            if argv:
                found.append((page, start, argv))
    return found


COMMANDS = _commands()


def test_commands_found():
    """The collector sees the README's demo command and a fair number of others (guards against a silent 0)."""
    assert any(p.name == "README.md" and argv == ["uge", "demo"] for p, _, argv in COMMANDS)
    assert len(COMMANDS) >= 10


@pytest.mark.parametrize("page,line,argv", COMMANDS, ids=[f"{_rel(p)}:{n}:{' '.join(a[:2])}" for p, n, a in COMMANDS])
def test_command_parses(page, line, argv):
    """Every shown `uge` command parses with the real parser; `--help` and `list` forms exit 0 by design."""
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            args = build_parser().parse_args(argv[1:])
        except SystemExit as e:
            assert e.code in (0, None), f"{_rel(page)}:{line}: {shlex.join(argv)}\n{err.getvalue()}"
            return
    if argv[1] == "protect":  # every flag shown is one of the chosen method's parameters (not only a valid flag)
        from uge.cli import _protect_params
        from uge.protectors import protector_class

        try:
            _protect_params(args, protector_class(args.method))
        except ConfigError as e:
            pytest.fail(f"{_rel(page)}:{line}: {shlex.join(argv)}\n{e}")


def _readme_results():
    """scripts/readme_results.py as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("readme_results", ROOT / "scripts" / "readme_results.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_readme_results_table_is_written_from_the_records():
    """The README's table holds what scripts/readme_results.py computes from the committed records."""
    mod = _readme_results()
    text = (ROOT / "README.md").read_text()
    assert mod.table() in text


def test_readme_results_reads_one_hacker_of_a_run_with_several():
    """A row may name its hacker by the records' init: a run with a pretrained and a random-init hacker gives each
    its own clean accuracy and worst case, not the worst over both; an init without records is an error."""
    mod = _readme_results()
    run, variant = "battery-tap-probe-cpu", "TAP against the owner's pretrained features, linear probe"
    pre = mod.numbers(run, variant, "sealed", "file:resnetc20-c100-250-s1.safetensors")
    rand = mod.numbers(run, variant, "sealed", "seed:1")
    both = mod.numbers(run, variant, "sealed")
    assert (pre["clean"], rand["clean"]) == (71.2, 56.9)
    assert pre["attacks"] == rand["attacks"] == 5 and both["attacks"] == 11
    assert both["worst"] == max(pre["worst"], rand["worst"]) and pre["worst"] != rand["worst"]
    with pytest.raises(SystemExit, match="no hacker records"):
        mod.numbers(run, variant, "sealed", "seed:7")


def test_the_standing_compares_the_default_with_rows_at_its_budget_only():
    """A row at a larger budget (issue 20: a separate, labelled row) is in the table but not among the default's
    rivals: its worst case would otherwise pass for what the field reaches at the default's budget."""
    mod = _readme_results()
    rows = [r for r in mod.ROWS if not mod._pretrained(r[4] if len(r) > 4 else None)
            and tuple(r[1:]) not in (tuple(mod.DEFAULT[1:]), mod.FULL)]
    rho = mod.numbers(*mod.DEFAULT[1:])["rho"]
    larger = [n for n in (mod.numbers(*r[1:]) for r in rows) if n["rho"] is not None and n["rho"] > rho]
    assert larger and min(n["fraction"] for n in larger) < STANDING["lowest_other"]   # it would have counted
    assert STANDING["protections"] == len(rows) - len(larger) + 1
