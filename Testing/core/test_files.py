"""CTFMLib.files: names that become paths, guarded deletes, atomic private writes, outputs against inputs."""

import errno
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from CTFMLib import files
from CTFMLib.files import FileSafetyError, OutputExistsError, WriteError

# --- names -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [
    "", " ", ".", "..", "a/b", "../x", "a\\b", "..\\..\\x", "C:evil", "c:\\x", "/abs", "x\x00y", "tab\tname",
    "esc\x1b[31m", "a:b", "what?", "star*", "pipe|x", 'quote"', "<x>", "trailing.", "trailing ", "CON", "nul.txt",
    "lpt1", "x" * 256, "é" * 200,
])
def test_safe_name_refuses_what_is_not_one_plain_name_on_every_platform(name):
    with pytest.raises(FileSafetyError):
        files.safe_name(name, "model id")


@pytest.mark.parametrize("name", ["owner--name", "ct_fm_feature_extractor", "ü空 x", "a.b-c_d", "...x", "Con-model"])
def test_safe_name_keeps_ordinary_names(name):
    assert files.safe_name(name) == name


def test_child_path_stays_inside_its_root(tmp_path):
    root = tmp_path / "store"
    root.mkdir()
    assert files.child_path(root, "m1") == root / "m1"
    (tmp_path / "elsewhere").mkdir()
    (root / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(FileSafetyError, match="leads outside"):
        files.child_path(root, "link")
    with pytest.raises(FileSafetyError):
        files.child_path(root, "..")


def test_remove_tree_refuses_the_store_itself_and_anything_outside(tmp_path):
    store = tmp_path / "store"
    (store / "a" / "deep").mkdir(parents=True)
    (tmp_path / "precious.txt").write_text("mine")
    for target in (store, tmp_path, store / "..", store / "a" / ".." / "..", tmp_path / "precious.txt"):
        with pytest.raises(FileSafetyError, match="refused to delete"):
            files.remove_tree(target, store)
    assert (tmp_path / "precious.txt").read_text() == "mine" and (store / "a" / "deep").is_dir()
    files.remove_tree(store / "a", store)
    assert store.is_dir() and not (store / "a").exists()
    files.remove_tree(store / "missing", store)  # nothing there: no error


def test_remove_tree_removes_a_link_never_its_target(tmp_path):
    store, outside = tmp_path / "store", tmp_path / "outside"
    store.mkdir()
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    (store / "link").symlink_to(outside, target_is_directory=True)
    files.remove_tree(store / "link", store)
    assert not os.path.lexists(store / "link") and (outside / "keep.txt").read_text() == "keep"


# --- atomic writes ---------------------------------------------------------------------------------

def test_atomic_output_renames_only_a_complete_file_with_normal_permissions(tmp_path):
    target = tmp_path / "out" / "result.bin"
    with files.atomic_output(target) as tmp:
        assert tmp.name == "result.bin" and tmp.parent.name.startswith(files.TEMP_PREFIX)
        assert oct(tmp.parent.stat().st_mode & 0o777) == "0o700"
        tmp.write_bytes(b"data")
        assert not target.exists()
    assert target.read_bytes() == b"data"
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask
    assert os.listdir(target.parent) == ["result.bin"]


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_a_failed_write_leaves_neither_a_final_nor_a_temporary_file(tmp_path, error):
    (tmp_path / "old.bin").write_bytes(b"old")
    with pytest.raises(type(error)):
        with files.atomic_output(tmp_path / "old.bin") as tmp:
            tmp.write_bytes(b"half")
            raise error
    assert os.listdir(tmp_path) == ["old.bin"] and (tmp_path / "old.bin").read_bytes() == b"old"
    assert files.live_temporaries() == []


def test_a_writer_that_wrote_nothing_is_an_error(tmp_path):
    with pytest.raises(WriteError, match="produced no file"):
        with files.atomic_output(tmp_path / "x.txt"):
            pass
    assert os.listdir(tmp_path) == []


def test_a_link_planted_at_the_final_name_is_replaced_not_followed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "out.txt").symlink_to(victim)
    files.atomic_write_text(tmp_path / "out.txt", "result")
    assert victim.read_text() == "precious"
    assert not (tmp_path / "out.txt").is_symlink() and (tmp_path / "out.txt").read_text() == "result"


def test_without_overwrite_an_existing_file_is_never_replaced(tmp_path):
    (tmp_path / "a.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        files.atomic_write_text(tmp_path / "a.txt", "new", overwrite=False)
    # A file that appears while the work runs is not replaced either (checked again at the rename).
    with pytest.raises(OutputExistsError):
        with files.atomic_output(tmp_path / "b.txt", overwrite=False) as tmp:
            tmp.write_text("new")
            (tmp_path / "b.txt").write_text("theirs")
    assert (tmp_path / "a.txt").read_text() == "mine" and (tmp_path / "b.txt").read_text() == "theirs"
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "b.txt"]


def test_a_folder_is_never_an_output_file(tmp_path):
    (tmp_path / "d.npy").mkdir()
    with pytest.raises(FileSafetyError, match="is a folder"):
        files.atomic_write_bytes(tmp_path / "d.npy", b"x")
    assert os.listdir(tmp_path / "d.npy") == []


def test_atomic_outputs_commit_together_or_not_at_all(tmp_path):
    a, b = tmp_path / "map.nii", tmp_path / "map.labels.json"
    with files.atomic_outputs([a, b]) as (ta, tb):
        ta.write_text("map")
        tb.write_text("labels")
    assert a.read_text() == "map" and b.read_text() == "labels"
    (tmp_path / "c.txt").write_text("theirs")
    with pytest.raises(OutputExistsError):  # the second output exists: the first is taken back
        with files.atomic_outputs([tmp_path / "new.txt", tmp_path / "c.txt"], overwrite=False) as (t1, t2):
            t1.write_text("1")
            t2.write_text("2")
    assert sorted(os.listdir(tmp_path)) == ["c.txt", "map.labels.json", "map.nii"]


def test_describe_os_error_names_the_cause():
    assert "no space left" in files.describe_os_error(OSError(errno.ENOSPC, "x"), "/d/f")
    assert "read-only" in files.describe_os_error(OSError(errno.EROFS, "x"), "/d/f")
    assert "not allowed" in files.describe_os_error(OSError(errno.EACCES, "x"), "/d/f")


# --- outputs against inputs -------------------------------------------------------------------------

def test_check_outputs_refuses_an_input_by_any_name(tmp_path):
    scan = tmp_path / "ct.nii.gz"
    scan.write_bytes(b"ct")
    os.link(scan, tmp_path / "hard.nii.gz")
    (tmp_path / "soft.nii.gz").symlink_to(scan)
    (tmp_path / "sub").mkdir()
    for out in (scan, tmp_path / "hard.nii.gz", tmp_path / "soft.nii.gz", tmp_path / "sub" / ".." / "ct.nii.gz"):
        with pytest.raises(FileSafetyError, match="is the input"):
            files.check_outputs([out], [scan], overwrite=True)


def test_check_outputs_refuses_folders_duplicates_files_of_input_folders_and_existing_files(tmp_path):
    series = tmp_path / "series"
    series.mkdir()
    (series / "1.dcm").write_bytes(b"dicom")
    with pytest.raises(FileSafetyError, match="input folder"):
        files.check_outputs([series / "1.dcm"], [series], overwrite=True)
    files.check_outputs([series / "new.nii.gz"], [series])  # a new file beside the slices harms nothing
    with pytest.raises(FileSafetyError, match="existing folder"):
        files.check_outputs([tmp_path / "series"], [], overwrite=True)
    with pytest.raises(FileSafetyError, match="same file"):
        files.check_outputs([tmp_path / "a.nii", tmp_path / "sub" / ".." / "a.nii"], [])
    (tmp_path / "a.nii").write_bytes(b"x")
    with pytest.raises(OutputExistsError):
        files.check_outputs([tmp_path / "a.nii"], [])
    files.check_outputs([tmp_path / "a.nii"], [], overwrite=True)


# --- SIGTERM --------------------------------------------------------------------------------------

def test_sigterm_unwinds_so_temporary_files_are_removed(tmp_path):
    """What Slicer's Cancel sends: the write in progress is abandoned and its private folder removed."""
    script = tmp_path / "writer.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(Path(files.__file__).parents[1])!r})
        from CTFMLib import files
        from CTFMLib.progress import Terminated, terminate_on_sigterm
        with terminate_on_sigterm():
            try:
                with files.atomic_output({str(tmp_path / 'out' / 'big.bin')!r}) as tmp:
                    with open(tmp, "wb") as f:
                        f.write(b"x" * 1000)
                        f.flush()
                        print("writing", flush=True)
                        time.sleep(60)
            except Terminated as e:
                sys.exit(e.exit_code)
    """))
    child = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "writing"
    assert len(list((tmp_path / "out").iterdir())) == 1  # the private temporary folder
    child.send_signal(signal.SIGTERM)
    assert child.wait(timeout=30) == 128 + signal.SIGTERM
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("where", ["atomic_output", "temporary_folder"])
def test_sigterm_the_moment_the_temporary_folder_appears_leaves_nothing(tmp_path, monkeypatch, where):
    """The window a watcher hits (Cancel as soon as the output folder changes): a real SIGTERM raised in
    this thread the instant ``mkdir`` created the private folder, before the writer could record it as
    created. The handler's exception unwinds from there: nothing is written and the folder is gone."""
    from CTFMLib.progress import Terminated, terminate_on_sigterm

    real_mkdir = os.mkdir
    made = []

    def mkdir_then_sigterm(path, *args, **kwargs):
        real_mkdir(path, *args, **kwargs)
        if Path(path).name.startswith(files.TEMP_PREFIX):
            made.append(Path(path))
            signal.raise_signal(signal.SIGTERM)  # to this thread: the handler runs before mkdir "returns"

    monkeypatch.setattr(files.os, "mkdir", mkdir_then_sigterm)
    body_ran = []
    with pytest.raises(Terminated), terminate_on_sigterm():
        if where == "atomic_output":
            with files.atomic_output(tmp_path / "labels.nii.gz") as tmp:
                body_ran.append(tmp)
                tmp.write_bytes(b"labels")
        else:
            with files.temporary_folder(tmp_path, "-export") as folder:
                body_ran.append(folder)
    monkeypatch.undo()
    assert len(made) == 1 and made[0].parent == tmp_path  # the folder did appear
    assert body_ran == [] and os.listdir(tmp_path) == [] and files.live_temporaries() == []


def test_the_next_write_removes_what_a_killed_writer_left_but_nothing_live_or_foreign(tmp_path):
    """SIGKILL cannot be cleaned up after; the next writer into that folder sweeps the dead writer's folder."""
    host = files.host_tag()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        made = {
            "dead": tmp_path / f"{files.TEMP_PREFIX}{host}-{dead.pid}-abc123",
            "alive": tmp_path / f"{files.TEMP_PREFIX}{host}-{sleeper.pid}-def456",
            "other host": tmp_path / f"{files.TEMP_PREFIX}elsewhere-{dead.pid}-ghi789",
            "not ours": tmp_path / "user-folder",
        }
        for folder in made.values():
            folder.mkdir()
            (folder / "half.nii.gz").write_bytes(b"partial")
        files.atomic_write_text(tmp_path / "result.txt", "done")
        assert not made["dead"].exists()
        assert all(made[k].is_dir() for k in ("alive", "other host", "not ours"))
        assert sorted(os.listdir(tmp_path)) == sorted([p.name for k, p in made.items() if k != "dead"] + ["result.txt"])
    finally:
        sleeper.kill()
        sleeper.wait()


# Where a file may be renamed into place by hand: files.py (the one helper), the model store's swap of a whole
# imported model folder (a directory rename, which the file helpers do not cover) and the trainer's export, which
# moves files a task wrote in a private folder onto atomic_outputs' own temporaries (the helper commits them), and
# CTFMTrain's check that its output folder is writable (a temporary file that deletes itself, never renamed).
RENAMES_ALLOWED = {("CTFMLib/files.py", "*"), ("CTFMLib/weights.py", "_install"),
                   ("CTFMLib/model_store.py", "_install"), ("CTFMLib/train/trainer.py", "_export"),
                   ("CTFMTrain/CTFMTrain.py", "check_output_directory")}


def renames_by_hand(path: Path, relative: str) -> list:
    """``os.replace``/``os.rename``/``shutil.move``/``tempfile.mkstemp``/``NamedTemporaryFile`` calls and
    ``Path.rename(x)``/``Path.replace(x)`` (one argument: ``str.replace`` takes two) outside the allowed places."""
    import ast

    found = []

    def visit(node, function):
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            if isinstance(child, ast.Call) and isinstance(child.func, ast.Attribute):
                owner = child.func.value.id if isinstance(child.func.value, ast.Name) else None
                name = child.func.attr
                by_module = (owner, name) in {("os", "replace"), ("os", "rename"), ("shutil", "move"),
                                              ("tempfile", "mkstemp"), ("tempfile", "NamedTemporaryFile")}
                by_path = name in ("rename", "replace") and owner not in ("os", "str") and len(child.args) == 1 \
                    and not child.keywords
                allowed = (relative, "*") in RENAMES_ALLOWED or (relative, function) in RENAMES_ALLOWED
                if (by_module or by_path) and not allowed:
                    found.append(f"{relative}:{child.lineno} in {function}(): {owner or '...'}.{name}")
            visit(child, inner)

    visit(ast.parse(path.read_text(encoding="utf-8")), "<module>")
    return found


def test_every_write_goes_through_the_one_atomic_helper():
    """Users' files are written only through CTFMLib.files (atomic_output, atomic_outputs, atomic_write_*), so one
    place answers for "a complete file or none, never an overwrite it was not allowed": no module renames a
    temporary into place by hand."""
    repo = Path(__file__).resolve().parents[2]
    offenders = []
    for root in ("CTFM", "CTFMSegment", "CTFMRetrieve", "CTFMTrain"):
        for path in (repo / root).rglob("*.py"):
            if "__pycache__" in path.parts:
                continue
            relative = path.relative_to(repo / "CTFM").as_posix() if root == "CTFM" else path.relative_to(repo).as_posix()
            offenders += renames_by_hand(path, relative)
    assert offenders == []


def test_the_rename_check_sees_hand_written_renames(tmp_path):
    source = tmp_path / "module.py"
    source.write_text("import os\nfrom pathlib import Path\n\ndef save(a, b):\n    os.replace(a, b)\n"
                      "    Path(a).rename(b)\n    return 'x.tmp'.replace('.tmp', '')\n", encoding="utf-8")
    assert [line.split(": ")[1] for line in renames_by_hand(source, "CTFMLib/module.py")] == ["os.replace", "....rename"]
    assert renames_by_hand(source, "CTFMLib/files.py") == []
