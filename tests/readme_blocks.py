"""The commands and Python snippets shown in README.md, as the tests see them.

Fenced blocks tagged ``bash``, ``sh``, ``shell``, ``console`` or not tagged at all hold shell
commands; ``python`` blocks are snippets; any other tag (``text``, ``json``, ...) is shown, not run,
and is how a README marks an example that cannot run as written. In shell blocks a trailing
backslash continues a line, ``#`` starts a comment (as the shell reads it: not inside quotes), and
in ``console`` blocks only lines starting with ``$ `` are commands (the rest is their output).
"""
from __future__ import annotations

import dataclasses
import re
import shlex

SHELL_TAGS = frozenset({"", "bash", "sh", "shell", "console"})
_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")
_ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


@dataclasses.dataclass(frozen=True)
class Command:
    """One shell command: ``env`` holds leading ``NAME=value`` assignments, ``argv`` the rest."""

    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    line: int  # 1-based README line where the command starts

    @property
    def text(self) -> str:
        """The command normalised to one line (comments and continuations gone, quoting kept)."""
        words = [f"{k}={shlex.quote(v)}" for k, v in self.env] + [shlex.quote(a) for a in self.argv]
        return " ".join(words)


@dataclasses.dataclass(frozen=True)
class Snippet:
    """A fenced ``python`` block."""

    code: str
    line: int  # 1-based README line of its first code line


def fenced_blocks(text: str) -> list[tuple[str, int, list[str]]]:
    """[(tag, first content line number, lines)] of every fenced block, in order."""
    blocks = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, tag = m.group(2), m.group(3).lower()
        start = i + 1
        j = start
        while j < len(lines) and not lines[j].strip().startswith(fence):
            j += 1
        blocks.append((tag, start + 1, lines[start:j]))
        i = j + 1
    return blocks


def _logical_lines(tag: str, first_line: int, lines: list[str]) -> list[tuple[int, str]]:
    """Join backslash continuations; in console blocks keep only ``$ `` lines (and their continuations)."""
    out: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None
    for offset, raw in enumerate(lines):
        number = first_line + offset
        line = raw.rstrip()
        if pending is None:
            if tag == "console":
                if not line.lstrip().startswith("$ "):
                    continue
                line = line.lstrip()[2:]
            pending = (number, "")
        text = pending[1] + line
        if text.endswith("\\"):
            pending = (pending[0], text[:-1] + " ")
            continue
        out.append((pending[0], text))
        pending = None
    if pending is not None:
        out.append(pending)
    return out


def parse_command(line_number: int, text: str) -> Command | None:
    """One logical shell line -> :class:`Command`, or None when it is only a comment or blank."""
    words = shlex.split(text, comments=True)
    env = []
    while words and _ENV_ASSIGNMENT.match(words[0]):
        name, value = words.pop(0).split("=", 1)
        env.append((name, value))
    if not words:
        return None
    return Command(argv=tuple(words), env=tuple(env), line=line_number)


def readme_items(text: str) -> list[Command | Snippet]:
    """Every shell command and Python snippet of a README, in document order."""
    items: list[Command | Snippet] = []
    for tag, first, lines in fenced_blocks(text):
        if tag == "python":
            items.append(Snippet(code="\n".join(lines) + "\n", line=first))
        elif tag in SHELL_TAGS:
            for number, logical in _logical_lines(tag, first, lines):
                command = parse_command(number, logical)
                if command is not None:
                    items.append(command)
    return items
