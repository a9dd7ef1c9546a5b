"""The command line's surface, recorded: every command and its options as the 0.1.0 release with issue 17's
one CLI style has them (``--json`` a flag everywhere, ``ctfm triage --json-out``, ``--max-memory-gb`` for
pretraining). A refactoring that drops, renames or adds an option fails here; a deliberate change updates
this record and the CHANGELOG together."""

import argparse

from CTFMLib.cli import build_parser

RECORDED = {
    "ctfm": "--debug --progress --version",
    "ctfm info": "--debug --json --progress",
    "ctfm models": "--debug --force --id --json --progress --revision ACTION NAME",
    "ctfm embed": (
        "--aggregate --batch-size --debug --device --json --mode --out --overwrite --point --precision "
        "--progress --ras --series --threads --weights IMAGE"
    ),
    # --statistics and `ctfm stats` added deliberately (issue 19 item 2: organ statistics);
    # --dicom-reference, --seg-type and --sr deliberately (issue 19 items 1 and 3: DICOM SEG and its TID 1500 SR);
    # --dicom-tree deliberately (issue 19 item 5: a batch over a folder tree of DICOM studies)
    "ctfm segment": (
        "--batch-size --debug --device --dicom-reference --dicom-tree --fast --interpolation --json --largest-component "
        "--max-memory-gb --model --out --out-dir --out-format --overwrite --plan --precision --progress --quality "
        "--seg-type --series --spacing --sr --statistics --structures --threads IMAGE"
    ),
    "ctfm stats": "--csv --debug --json --out --overwrite --progress --series IMAGE LABELS",
    # `ctfm export-seg` added deliberately (issue 19 item 6: a DICOM SEG of an existing result, for Slicer)
    "ctfm export-seg": "--debug --json --out --overwrite --progress --reference --seg-type --series LABELS",
    "ctfm train": (
        "--allow-non-ct --config --debug --device --json --max-memory-gb --max-steps --out --progress "
        "--resume TASK"
    ),
    "ctfm triage": (
        "--debug --device --json --json-out --method --model --overwrite --progress --saliency --series IMAGE"
    ),
    # --precision added deliberately (issue 18: precision "auto" everywhere it applies; default fp32 as before)
    "ctfm saliency": (
        "--batch-size --center --cube --debug --device --json --mask-size --max-memory-gb --method --model "
        "--out --overlap --overwrite --precision --progress --ras --roi --series --spacing --steps --target "
        "--threads --weights IMAGE"
    ),
    "ctfm index": "--debug --progress",
    "ctfm index add": (
        "--allow-non-ct --batch-size --debug --device --json --precision --progress --stride --threads "
        "--weights INDEX SCANS"
    ),
    # --metadata and compact's --hnsw added deliberately (issue: the PostgreSQL index: a metadata filter for both
    # backends, PostgreSQL's HNSW indexes)
    "ctfm index query": (
        "--batch-size --box --debug --device --exclude-patient --exclude-scan --json --metadata --metric "
        "--overwrite --per-scan --point --precision --progress --ras --series --threads --thumbnails --weights -k "
        "IMAGE INDEX"
    ),
    "ctfm index info": "--check --debug --json --progress INDEX",
    "ctfm index check": "--debug --json --progress --repair INDEX",
    "ctfm index remove": "--debug --json --progress --series INDEX TARGET",
    "ctfm index compact": "--debug --hnsw --json --progress INDEX",
    "ctfm index reembed": (
        "--allow-non-ct --batch-size --debug --device --json --precision --progress --threads --weights INDEX "
        "OUTPUT"
    ),
    "ctfm index eval": "--debug --exclude-patient --json --labels --metric --progress -k INDEX",
}


def _commands(parser, path=("ctfm",)):
    yield " ".join(path), parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, path + (name,))


def _options(parser) -> str:
    return " ".join(sorted("/".join(a.option_strings) if a.option_strings else a.dest.upper()
                           for a in parser._actions
                           if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))))


def test_the_commands_and_their_options_are_the_recorded_ones():
    now = {name: _options(parser) for name, parser in _commands(build_parser())}
    assert sorted(now) == sorted(RECORDED), "commands added or removed"
    changed = {name: (RECORDED[name], now[name]) for name in now if now[name] != RECORDED[name]}
    assert changed == {}, changed


def test_every_command_prints_its_help(capsys):
    import pytest

    for name, _ in _commands(build_parser()):
        with pytest.raises(SystemExit) as exit_:
            build_parser().parse_args(name.split()[1:] + ["--help"])
        assert exit_.value.code == 0
        assert "usage: " + name in capsys.readouterr().out
