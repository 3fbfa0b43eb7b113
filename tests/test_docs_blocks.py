"""The code blocks of docs/first-hour.md do what the page says: run top to bottom in one
directory against a fresh database (``PGTQ_DSN``), each ``python`` block saved under the name on
its first line, each ``$ pgtq ...`` and ``$ python FILE.py`` command run, and the output shown
under a command found in what it prints. The quickstart's ``python`` blocks, fragments of one
app, are compiled.
"""

from __future__ import annotations

import ast
import re
import shlex
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy.engine import URL

from tests.conftest import libpq, user_env

DOCS = Path(__file__).resolve().parent.parent / "docs"
FIRST_HOUR = DOCS / "first-hour.md"
QUICKSTART = DOCS / "quickstart.md"

#: The shells' blocks, whose ``$ `` lines are commands and the lines after them their output.
SHELLS = frozenset({"console", "bash", "shell", "sh"})


@dataclass(frozen=True)
class Block:
    """A fenced code block of a page: its language, its text (unindented), and the line of its
    opening fence (counted from 1), for messages."""

    lang: str
    text: str
    line: int


@dataclass(frozen=True)
class Save:
    """A ``python`` block, saved as the file its first line names."""

    path: str
    text: str


@dataclass(frozen=True)
class Run:
    """A command the test runs, and the lines it must print (patterns, see :func:`pattern`)."""

    command: str
    expected: tuple[str, ...]


@dataclass(frozen=True)
class Skip:
    """A command the page shows but the test does not run, and why."""

    command: str
    why: str


Step = Save | Run | Skip

OPENING = re.compile(r"^(?P<indent> *)```(?P<lang>[\w-]*)\s*$")
FILE_HEADER = re.compile(r"^# (?P<path>[\w/.-]+\.py)\s*$")


def blocks(page: str) -> list[Block]:
    """The fenced code blocks of a Markdown page in order, those indented in a list too."""
    found: list[Block] = []
    lines = page.splitlines()
    i = 0
    while i < len(lines):
        opening = OPENING.match(lines[i])
        i += 1
        if opening is None:
            continue
        indent, start, body = len(opening["indent"]), i, []
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][indent:])
            i += 1
        i += 1  # the closing fence
        found.append(Block(opening["lang"], "\n".join(body) + "\n", start))
    return found


def not_run(argv: list[str], saved: set[str]) -> str | None:
    """Why the test does not run a command the page shows (None: it runs it)."""
    if argv[:1] == ["pgtq"]:
        if argv[1:2] == ["web"]:
            return "a server: runs until stopped"
        if argv[1:2] == ["worker"] and "--one-shot" not in argv:
            return "a worker without --one-shot: runs until stopped"
        if argv[1:2] == ["stats"] and "--watch" in argv:
            return "redraws until stopped"
        if argv[1:2] == ["embedded"] or "--embedded" in argv:
            return "starts or stops the embedded server (tests/test_embedded.py covers it)"
        return None
    if argv[:1] == ["python"] and len(argv) == 2 and argv[1] in saved:
        return None
    return "changes the machine or the shell (pip, venv, export), not pgtq"


def steps(page: str) -> list[Step]:
    """What the test does with a page, block by block."""
    found: list[Step] = []
    saved: set[str] = set()
    for block in blocks(page):
        if block.lang == "python":
            header = FILE_HEADER.match(block.text.splitlines()[0])
            assert header, f"line {block.line}: a python block starts with `# FILE.py`"
            saved.add(header["path"])
            found.append(Save(header["path"], block.text))
        elif block.lang in SHELLS:
            found.extend(_commands(block, saved))
    return found


def _commands(block: Block, saved: set[str]) -> list[Step]:
    commands: list[tuple[str, list[str]]] = []
    for line in block.text.splitlines():
        if line.startswith("$ "):
            commands.append((line[2:], []))
        elif line.strip():
            assert commands, f"line {block.line}: output before any `$ ` command"
            commands[-1][1].append(line)
    result: list[Step] = []
    for command, output in commands:
        why = not_run(shlex.split(command, comments=True), saved)
        result.append(Run(command, tuple(output)) if why is None else Skip(command, why))
    return result


def pattern(expected: str) -> re.Pattern[str]:
    """A line of shown output as a pattern: ``...`` is anything, a number any number."""
    parts = re.split(r"(\.\.\.|\d+)", expected)
    regex = "".join(
        ".*" if part == "..." else r"\d+" if part.isdigit() else re.escape(part) for part in parts
    )
    return re.compile(regex)


def shown_in(expected: str, printed: str, *, threads: bool = False) -> bool:
    """Whether a line of shown output is one of the lines printed. ``threads``: a worker's
    output, where sync tasks print from threads and ``print`` writes its newline separately,
    so two such lines may run into one another ("sending 'Welcome' to ada@example.comsending
    'Hi' to ..."): the line is also found where a printed one begins or ends."""
    line = pattern(expected)
    lines = [p.strip() for p in printed.splitlines()]
    if any(line.fullmatch(p) for p in lines):
        return True
    ends = re.compile(f"(?:{line.pattern})$")
    return threads and any(line.match(p) or ends.search(p) for p in lines)


# -- the reading of a page, no database -----------------------------------------------------------


@pytest.mark.unit
def test_blocks_are_read_with_their_language_and_unindented() -> None:
    page = (
        "text\n```python\n# a.py\nx = 1\n```\n- item\n\n  ```console\n  $ pgtq --version\n  ```\n"
    )
    assert blocks(page) == [
        Block("python", "# a.py\nx = 1\n", 2),
        Block("console", "$ pgtq --version\n", 8),
    ]


@pytest.mark.unit
def test_what_runs_and_what_does_not() -> None:
    page = (
        "```python\n# job.py\nprint(1)\n```\n"
        "```console\n$ python -m venv .venv && . .venv/bin/activate\n$ python job.py\n1\n"
        "$ pgtq worker a:app --one-shot\n...processed 1 job(s)...\n$ pgtq worker a:app\n"
        "$ pgtq web a:app  # http://127.0.0.1:8080/\n$ pgtq stats --watch\n$ pgtq stats\n"
        "$ pgtq migrate --embedded\n$ pgtq embedded stop\n```\n"
    )
    assert steps(page) == [
        Save("job.py", "# job.py\nprint(1)\n"),
        Skip("python -m venv .venv && . .venv/bin/activate", not_run(["python", "-m"], set())),
        Run("python job.py", ("1",)),
        Run("pgtq worker a:app --one-shot", ("...processed 1 job(s)...",)),
        Skip("pgtq worker a:app", "a worker without --one-shot: runs until stopped"),
        Skip("pgtq web a:app  # http://127.0.0.1:8080/", "a server: runs until stopped"),
        Skip("pgtq stats --watch", "redraws until stopped"),
        Run("pgtq stats", ()),
        Skip("pgtq migrate --embedded", not_run(["pgtq", "embedded"], set())),
        Skip("pgtq embedded stop", not_run(["pgtq", "--embedded"], set())),
    ]


@pytest.mark.unit
def test_shown_output_is_a_pattern() -> None:
    assert shown_in("pgtq 0.1.0", "pgtq 12.3.40\n")
    assert shown_in(
        "...processed 3 job(s) (succeeded 3)...", "x | processed 5 job(s) (succeeded 5) in 0.2 s"
    )
    assert not shown_in("...processed 3 job(s) (succeeded 3)...", "processed 5 job(s) (failed 5)")
    assert not shown_in("Job 4 is waiting again", "Job 4 is waiting again, or not")
    ran_into = "sending 'a' to xsending 'b' to y"
    assert shown_in("sending 'a' to x", ran_into, threads=True)
    assert shown_in("sending 'b' to y", ran_into, threads=True)
    assert not shown_in("sending 'a' to x", ran_into)


@pytest.mark.unit
def test_every_saved_file_of_the_first_hour_is_used_by_a_later_command() -> None:
    """No dead block: each file is run, or imported by a command (``module:app``)."""
    page = steps(FIRST_HOUR.read_text())
    for i, step in enumerate(page):
        if isinstance(step, Save):
            module = step.path.removesuffix(".py").replace("/", ".")
            later = [s.command for s in page[i + 1 :] if isinstance(s, Run)]
            assert any(step.path in c.split() or f"{module}:" in c for c in later), step.path


@pytest.mark.unit
@pytest.mark.parametrize("page", [FIRST_HOUR, QUICKSTART], ids=lambda p: p.name)
def test_the_python_blocks_compile(page: Path) -> None:
    for block in blocks(page.read_text()):
        if block.lang == "python":
            compile(
                block.text,
                f"{page.name}:{block.line}",
                "exec",
                flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT,
            )


# -- the page, run --------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_first_hour_runs_as_written(tmp_path: Path, make_database: Callable[[], URL]) -> None:
    env = user_env(PGTQ_DSN=libpq(make_database()))  # empty: the page migrates it
    ran = 0
    for step in steps(FIRST_HOUR.read_text()):
        if isinstance(step, Save):
            (tmp_path / step.path).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / step.path).write_text(step.text)
        elif isinstance(step, Run):
            done = subprocess.run(
                ["bash", "-c", step.command],
                cwd=tmp_path,
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            printed = done.stdout + done.stderr
            assert done.returncode == 0, f"$ {step.command} exited {done.returncode}:\n{printed}"
            threads = step.command.startswith("pgtq worker")
            for line in step.expected:
                found = shown_in(line, printed, threads=threads)
                assert found, f"$ {step.command}: {line!r} not in\n{printed}"
            ran += 1
    assert ran >= 10
