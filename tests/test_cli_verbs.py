"""The verb table of cli.main: a command line that names a verb builds only its module's parsers, and the table stays true."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from snapferry.cli.main import VERB_MODULE, build_parser


def _verbs(parser: argparse.ArgumentParser) -> set[str]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return set(sub.choices)


def test_the_table_names_every_verb_the_modules_add() -> None:
    assert _verbs(build_parser()) == set(VERB_MODULE)


@pytest.mark.parametrize("verb", sorted(VERB_MODULE))
def test_a_verb_alone_builds_its_own_module_only(verb: str) -> None:
    same_module = {name for name, module in VERB_MODULE.items() if module == VERB_MODULE[verb]}
    assert _verbs(build_parser(verb)) == same_module


def test_a_command_imports_no_other_verb_module() -> None:
    script = (
        "import sys\n"
        "from snapferry.cli import main as m\n"
        "try:\n"
        "    m.main(['token', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(sorted(k for k in sys.modules if k.endswith('_cmd')))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "['snapferry.cli.token_cmd']"


def _snapferry(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "snapferry", *argv], capture_output=True, text=True)


def test_an_unknown_verb_is_told_every_verb() -> None:
    done = _snapferry("bogus")
    assert done.returncode == 2
    assert "invalid choice: 'bogus'" in done.stderr and "'send'" in done.stderr and "'demo'" in done.stderr


def test_no_verb_and_version_still_work() -> None:
    assert "required: COMMAND" in _snapferry().stderr
    assert _snapferry("--version").stdout.startswith("snapferry ")
