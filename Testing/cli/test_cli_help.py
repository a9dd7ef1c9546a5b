"""One command-line style: every option, positional and action says what it is, and the shared options work
before or after the subcommand (issue 17, defect 8)."""

import argparse

import pytest

from CTFMLib.cli import build_parser


def _subparsers(parser, path=("ctfm",)):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _subparsers(sub, path + (name,))


def test_every_option_of_every_subcommand_has_help_text():
    missing = []
    for path, parser in _subparsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
                continue
            if not (action.help or "").strip() or action.help == argparse.SUPPRESS:
                missing.append(f"{' '.join(path)} {'/'.join(action.option_strings) or action.dest}")
    assert missing == [], "options without help:\n" + "\n".join(missing)


@pytest.mark.parametrize("argv", [
    ["--progress", "json", "info"],
    ["info", "--progress", "json"],
    ["index", "info", "somewhere", "--progress", "json"],
    ["models", "list", "--progress", "json", "--debug"],
])
def test_progress_and_debug_work_before_or_after_the_subcommand(argv):
    args = build_parser().parse_args(argv)
    assert args.progress == "json"
    assert args.debug == ("--debug" in argv)


def test_defaults_hold_when_the_shared_options_are_not_given():
    args = build_parser().parse_args(["info"])
    assert args.progress == "bar" and args.debug is False


def test_counts_agree_with_their_nouns():
    from CTFMLib.text import count

    assert [count(n, "structure") for n in (0, 1, 2)] == ["0 structures", "1 structure", "2 structures"]
    assert count(1, "patch", "patches") == "1 patch" and count(3, "patch", "patches") == "3 patches"


def test_no_message_pluralises_by_hand():
    """Messages count through CTFMLib.text.count: no f-string puts a number before a plural noun
    ("1 structures present", "training 1 steps"), the defect this guards against."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "CTFM" / "CTFMLib"
    pattern = re.compile(r"\{[^{}]+\} (structures|patches|steps|windows) (present|on|;|\))")
    hits = [f"{path.relative_to(root)}:{n}" for path in root.rglob("*.py")
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if pattern.search(line)]
    assert hits == []
