#!/usr/bin/env python-real
"""CT-FM Train: Slicer scripted CLI module (SlicerExecutionModel; flags in CTFMTrain.xml).

Slicer runs this file in a separate process with the flags of CTFMTrain.xml
and follows the ``<filter-progress>`` / ``<filter-comment>`` lines it prints;
it runs just as well from a shell:

    PythonSlicer CTFMTrain.py --task check --device auto --maxSteps 0 --outputDirectory /tmp/ctfm-train

``--task check`` verifies the training environment for real (Python,
CTFMLib, PyTorch, the device computes, the output folder is writable, the
configuration file parses). ``--task pretrain`` trains CT-FM on the scans the
configuration lists, ``--task segment`` fine-tunes a segmentation network on scans
with label maps, ``--task classify`` a scan-level classifier on labelled scans
(CTFMLib.train); each writes checkpoints, metrics.csv and at the end a model folder.
The output folder must be new, empty or an earlier run of the same task (it holds
``ctfm-run.json``); anything else is refused before anything is written.
SIGTERM or SIGINT ends a run after the current step with a checkpoint; the run then
exits 143 (SIGTERM) or 130 (SIGINT), not 0, with an ERROR line saying how to resume,
so a scheduler (and Slicer: "completed with errors") sees that it did not finish.
A process killed outright (Slicer's Cancel kills the CLI process) loses at most the
steps since the last periodic checkpoint, and ``--resume`` continues from there.
"""

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

TASKS = ("check", "pretrain", "segment", "classify")
DEVICES = ("auto", "cpu", "cuda", "mps")
EXIT_OK = 0
EXIT_PROBLEMS = 1  # the environment or the arguments are not usable
NAME = "CTFMTrain"


def add_ctfmlib_to_path() -> None:
    """Make ``import CTFMLib`` work from the source tree and from an installed extension.

    Source tree: <repo>/CTFMTrain/CTFMTrain.py next to <repo>/CTFM/CTFMLib.
    Built or installed extension: lib/Slicer-X.Y/cli-modules/CTFMTrain.py next to
    lib/Slicer-X.Y/qt-scripted-modules/CTFMLib.
    """
    try:
        import CTFMLib  # noqa: F401 - already importable (pip install, PYTHONPATH, Slicer)

        return
    except ImportError:
        pass
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "CTFM", here.parent / "qt-scripted-modules"):
        if (candidate / "CTFMLib" / "__init__.py").is_file():
            sys.path.insert(0, str(candidate))
            return


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """Flags as CTFMTrain.xml declares them (Slicer passes ``--<longflag> value``; booleans bare)."""
    parser = argparse.ArgumentParser(
        prog=NAME,
        description="Pretrain or fine-tune CT-FM (task 'check' verifies the training environment).",
    )
    parser.add_argument("--task", choices=TASKS, default="check", help="what to run (default: check)")
    parser.add_argument("--configFile", "--config-file", dest="config_file", default="", help="training configuration (.json or .yaml)")
    parser.add_argument("--outputDirectory", "--output-directory", dest="output_directory", default="", help="folder for checkpoints and logs")
    parser.add_argument("--device", choices=DEVICES, default="auto", help="auto, cpu, cuda or mps (default: auto)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in the output folder")
    parser.add_argument("--maxSteps", "--max-steps", dest="max_steps", type=non_negative_int, default=0, help="stop after this many steps; 0: the configuration's schedule")
    return parser


class Report:
    """Progress and findings: SEM filter lines on stdout, problems on stderr."""

    def __init__(self, progress):
        self.progress = progress
        self.problems = []

    def info(self, fraction, message: str) -> None:
        self.progress(fraction, message)  # <filter-comment> (Slicer's progress bar) and <filter-progress>
        if message and not message.startswith("step "):
            # Slicer strips the filter tags from the output text it keeps: say it plainly too, so the
            # CLI panel and the CT-FM Train section show it. Per-step lines go to metrics.csv instead.
            print(message, flush=True)

    def problem(self, message: str) -> None:
        self.problems.append(message)
        print(f"ERROR: {message}", file=sys.stderr, flush=True)


def check_output_directory(path: str, report: Report, required: bool) -> None:
    if not path:
        if required:
            report.problem("no output folder given (--outputDirectory)")
        else:
            report.info(None, "Output folder: none given (not needed for the check)")
        return
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".ctfm-write-test-"):
            pass
    except OSError as e:
        report.problem(f"output folder {folder} is not writable: {e}")
        return
    report.info(None, f"Output folder: {folder} (writable)")


def _parse_config(config: Path):
    text = config.read_text(encoding="utf-8")
    if config.suffix.lower() in (".yaml", ".yml"):
        import yaml  # optional: only YAML configurations need it

        return yaml.safe_load(text)
    return json.loads(text)


def check_config_file(path: str, report: Report, required: bool) -> None:
    if not path:
        if required:
            report.problem("no configuration file given (--configFile)")
        return
    config = Path(path)
    if not config.is_file():
        report.problem(f"configuration file {config} does not exist")
        return
    try:
        data = _parse_config(config)
    except ImportError:
        report.info(None, f"Configuration: {config} (YAML not checked: PyYAML is not installed)")
        return
    except Exception as e:  # json.JSONDecodeError, yaml.YAMLError, UnicodeDecodeError
        report.problem(f"configuration file {config} does not parse: {e}")
        return
    if not isinstance(data, dict):
        report.problem(f"configuration file {config} must hold a mapping of settings, not {type(data).__name__}")
        return
    report.info(None, f"Configuration: {config} ({len(data)} top-level settings)")


def check_torch(device: str, report: Report) -> None:
    try:
        import torch
    except ImportError as e:
        report.problem(f"PyTorch is not installed ({e}); in Slicer install it with the PyTorch extension")
        return
    cuda = torch.cuda.is_available()
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    report.info(0.5, f"PyTorch: {torch.__version__} (CUDA available: {cuda}, MPS available: {mps})")
    if device == "auto":
        chosen = "cuda" if cuda else "mps" if mps else "cpu"
    elif (device == "cuda" and not cuda) or (device == "mps" and not mps):
        report.problem(f"device '{device}' was requested but is not available on this computer; choose auto or cpu")
        return
    else:
        chosen = device
    try:
        x = torch.ones((64, 64), device=chosen)
        value = float((x @ x).sum().item())
    except Exception as e:
        report.problem(f"PyTorch cannot compute on device '{chosen}': {e}")
        return
    if value != 64.0 * 64 * 64:
        report.problem(f"device '{chosen}' computed a wrong result ({value})")
        return
    detail = f" ({torch.cuda.get_device_name(0)})" if chosen == "cuda" else ""
    report.info(0.75, f"Device: {chosen}{detail} computes correctly")


def run_check(args, report: Report) -> int:
    report.info(0.1, f"Python: {sys.version.split()[0]} on {platform.platform()}")
    import CTFMLib

    report.info(0.25, f"CTFMLib: {CTFMLib.__version__} from {Path(CTFMLib.__file__).parent}")
    check_torch(args.device, report)
    check_output_directory(args.output_directory, report, required=False)
    check_config_file(args.config_file, report, required=False)
    if report.problems:
        return EXIT_PROBLEMS
    report.info(1.0, "The training environment is ready.")
    return EXIT_OK


def run_training(args, report: Report) -> int:
    report.info(None, f"Task: {args.task}")
    check_config_file(args.config_file, report, required=True)
    if not args.output_directory:
        # Not created here: the training checks the folder (new, empty or a run of this task) before writing.
        report.problem("no output folder given (--outputDirectory)")
    if report.problems:
        return EXIT_PROBLEMS
    from CTFMLib.files import WriteError
    from CTFMLib.progress import Terminated, terminate_on_sigterm
    from CTFMLib.train.config import ConfigError
    from CTFMLib.train.run import CHECKPOINT, run
    from CTFMLib.train.trainer import TrainingError

    if args.resume and not (Path(args.output_directory) / CHECKPOINT).is_file():
        report.problem(f"--resume: no checkpoint ({CHECKPOINT}) in {args.output_directory}")
        return EXIT_PROBLEMS
    try:
        with terminate_on_sigterm():  # before the loop (which stops gracefully itself): unwind and clean up
            summary = run(args.task, args.config_file, args.output_directory, resume=args.resume,
                          max_steps=args.max_steps or None, device=args.device, progress=report.info)
    except Terminated as e:
        report.problem("terminated (SIGTERM); run again (with Resume when a checkpoint was written) to continue")
        return e.exit_code
    except (ConfigError, TrainingError, FileNotFoundError, ValueError, WriteError) as e:
        report.problem(" ".join(str(e).split()))
        return EXIT_PROBLEMS
    if summary.get("stopped"):
        report.info(None, f"Stopped at step {summary.get('steps')} ({summary.get('stop_reason')}); "
                          f"checkpoint {summary.get('checkpoint')}; run again with Resume to continue")
        # Not a success: the schedule did not run to its end (143 after SIGTERM, 130 after SIGINT).
        report.problem(f"training stopped ({summary.get('stop_reason')}) at step {summary.get('steps')} before the "
                       f"end of its schedule; the checkpoint {summary.get('checkpoint')} is kept: run again with "
                       "Resume to continue")
        return int(summary.get("exit_code") or 143)
    report.info(1.0, f"Done: {summary.get('steps')} steps, last loss {summary.get('last_loss')}; "
                     f"model in {Path(args.output_directory) / 'model'}")
    return EXIT_OK


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv == ["--xml"]:  # SlicerExecutionModel convention: describe yourself
        print((Path(__file__).resolve().parent / f"{NAME}.xml").read_text(encoding="utf-8"))
        return EXIT_OK
    args = build_parser().parse_args(argv)
    add_ctfmlib_to_path()
    try:
        from CTFMLib.progress import FilterProgress
    except ImportError as e:
        print(f"ERROR: cannot import CTFMLib ({e}); is the CT-FM extension installed completely?", file=sys.stderr)
        return EXIT_PROBLEMS

    started = time.monotonic()
    print(f"<filter-start>\n<filter-name>{NAME}</filter-name>\n<filter-comment>task {args.task}</filter-comment>\n</filter-start>", flush=True)
    report = Report(FilterProgress(sys.stdout))
    report.progress(0.0, f"CT-FM Train: {args.task}")
    if args.task == "check":
        code = run_check(args, report)
    else:
        code = run_training(args, report)
    print(f"<filter-end>\n<filter-name>{NAME}</filter-name>\n<filter-time>{time.monotonic() - started:.2f}</filter-time>\n</filter-end>", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
