"""Hundreds of generated bad inputs through the CLI, in process (issue 14's fuzz test).

The inputs are generated from fixed seeds (so a failure is reproducible): model ids and output paths
with ``..``, separators of every platform, drive letters and unicode; NIfTI/NRRD/MetaImage files with
damaged headers; random grids, valid and invalid; random values for every numeric option. For each:
no traceback; a refusal is exit 2 with exactly one line on stderr; nothing outside the sandbox
changes (the sandbox's siblings are hashed before and after), and nothing of the user's inside it
either (the model store's other entries, the inputs).
"""

import os
import random

import numpy as np
import pytest

from ctfm_testing.hostile import Result, ctfm, small_ct, tiny_encoder, tiny_segmenter, tree_digest

SEED = 20261207
BAD_ID_PIECES = ["..", ".", "/", "\\", "C:", "c:\\", ":", "*", "?", "<", ">", "|", '"', "\x00", "\t", "\x1b[2J",
                 "ü", "空", " ", "a", "owner", "CON", "nul", "x" * 300]
UNSAFE = set('/\\:*?<>|"') | {chr(c) for c in range(32)}


def unsafe(name: str) -> bool:
    """Independent of CTFMLib: would this id be a path (or an invalid name) on some platform?"""
    return (not name.strip() or name in (".", "..") or any(c in UNSAFE for c in name) or name != name.rstrip(" .")
            or len(name.encode()) > 255 or name.split(".")[0].strip().upper() in ("CON", "NUL", "PRN", "AUX"))


def bad_ids(rng, n):
    out = set()
    while len(out) < n:
        name = "".join(rng.choice(BAD_ID_PIECES) for _ in range(rng.randint(1, 4)))
        if unsafe(name):
            out.add(name)
    return sorted(out)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """world/{sandbox (cwd, CTFM_CACHE, inputs), siblings the commands must never touch}."""
    world = tmp_path_factory.mktemp("world")
    sandbox = world / "sandbox"
    (sandbox / "cache" / "hub").mkdir(parents=True)
    (sandbox / "cache" / "hub" / "sentinel").write_text("a download")
    (sandbox / "cache" / "user_notes.txt").write_text("mine")
    (world / "sibling").mkdir()
    for name in ("precious.nii.gz", "notes.npy", "heat.nii.gz", "heat.json", "labels.json", "seg.seg.nrrd"):
        (world / "sibling" / name).write_bytes(name.encode() * 10)
    (world / "sibling.txt").write_text("next to the sandbox")
    models = {"enc": tiny_encoder(world / "models" / "enc"), "seg": tiny_segmenter(world / "models" / "seg")}
    ct = small_ct(sandbox / "ct.nii.gz", shape=(24, 20, 10), spacing=(8.0, 8.0, 8.0))
    return {"world": world, "sandbox": sandbox, "ct": ct, **models}


@pytest.fixture
def run(world, monkeypatch):
    monkeypatch.setenv("CTFM_CACHE", str(world["sandbox"] / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(world["sandbox"])
    # The model store gets one imported model of the user's, which no refused command may touch.
    first = ctfm("models", "import", world["enc"], "--id", "user/keep")
    assert first.returncode == 0, first
    outside = {k: v for k, v in tree_digest(world["world"]).items() if not k.startswith("sandbox")}
    store = tree_digest(world["sandbox"] / "cache")
    inputs = tree_digest(world["sandbox"])
    seen = {"n": 0, "refused": 0}

    def check(args, refuse=True) -> Result:
        r = ctfm(*args)
        seen["n"] += 1
        where = f"ctfm {' '.join(map(repr, map(str, args)))}"
        assert "Traceback" not in r.stderr and r.returncode in (0, 2), (where, r)
        if refuse:
            assert r.returncode == 2, (where, r)
        if r.returncode == 2:
            seen["refused"] += 1
            assert len(r.lines) == 1 and r.lines[0].startswith("ctfm"), (where, r)
        now = {k: v for k, v in tree_digest(world["world"]).items() if not k.startswith("sandbox")}
        assert now == outside, (where, "changed outside the sandbox")
        store_now = tree_digest(world["sandbox"] / "cache")
        assert {k: v for k, v in store_now.items() if k in store} == store, (where, "the model store lost entries")
        return r

    yield check
    # Each test leaves the sandbox as it found it, but for what its successful commands wrote.
    for k, v in inputs.items():
        assert tree_digest(world["sandbox"]).get(k) == v or k.startswith("cache"), k
    assert seen["n"] >= 1


def test_fuzz_model_ids(run, world):
    rng = random.Random(SEED)
    ids = bad_ids(rng, 25)
    for name in ids:
        run(["models", "remove", name])
        run(["models", "import", world["enc"], "--id", name])
        run(["embed", world["ct"], "--weights", name, "--out", "e.npy"])
    assert len(ids) * 3 >= 75


def test_fuzz_output_paths(run, world):
    rng = random.Random(SEED + 1)
    sandbox, ct = world["sandbox"], world["ct"]
    os.link(ct, sandbox / "hard.nii.gz") if not (sandbox / "hard.nii.gz").exists() else None
    if not (sandbox / "soft.nii.gz").exists():
        (sandbox / "soft.nii.gz").symlink_to(ct)
    (sandbox / "folder.npy").mkdir(exist_ok=True)
    (sandbox / "folder.nii.gz").mkdir(exist_ok=True)
    same_as_input = ["ct.nii.gz", "./ct.nii.gz", "../sandbox/ct.nii.gz", "hard.nii.gz", "soft.nii.gz",
                     str(ct), "sub/../ct.nii.gz"]
    existing = ["../sibling/precious.nii.gz", "../sibling/heat.nii.gz", "../sibling/seg.seg.nrrd",
                str(world["world"] / "sibling" / "precious.nii.gz")]
    wrong = ["folder.nii.gz", "x.txt", "x.png", "x", "x.nii.gz.bak", "x.npz", "x.mhd"]
    cases = []
    for out in same_as_input + existing + wrong:
        cases.append(["segment", ct, "--model", world["seg"], "--out", out])
        cases.append(["saliency", ct, "--weights", world["enc"], "--target", "embedding", "--method", "gradient",
                      "--out", out])
    for out in ["folder.npy", "../sibling/notes.npy", "ct.nii.gz", "x.nii.gz"]:
        cases.append(["embed", ct, "--weights", world["enc"], "--out", out])
    rng.shuffle(cases)
    for args in cases:
        run(args)
    assert len(cases) >= 40


def _nifti_bytes(ct) -> bytes:
    import gzip

    return gzip.decompress(open(ct, "rb").read())


@pytest.mark.slow
def test_fuzz_corrupt_headers(run, world, tmp_path):
    """Damaged NIfTI (header bytes), NRRD and MetaImage (header fields): refused in one line, or read."""
    rng = random.Random(SEED + 2)
    raw = bytearray(_nifti_bytes(world["ct"]))
    cases = 0
    for i in range(30):
        data = bytearray(raw)
        for _ in range(rng.randint(1, 6)):
            pos = rng.choice([rng.randrange(0, 348), rng.choice([0, 40, 42, 70, 72, 76, 80, 84, 88, 108, 112, 116,
                                                                 252, 254, 280, 344])])
            data[pos] = rng.randrange(256)
        path = world["sandbox"] / f"damaged{i}.nii"
        path.write_bytes(bytes(data))
        run(["embed", path, "--weights", world["enc"], "--out", tmp_path / f"n{i}.npy"], refuse=False)
        cases += 1
    junk = ["nan", "-1", "0", "1e400", "abc", "", "3 3", "(nan,0,0) (0,1,0) (0,0,1)", "none", "-0", "1e-12"]
    header = ("NRRD0004\ntype: short\ndimension: 3\nspace: left-posterior-superior\nsizes: 24 20 10\n"
              "space directions: (8,0,0) (0,8,0) (0,0,8)\nkinds: domain domain domain\nendian: little\n"
              "encoding: raw\nspace origin: (0,0,0)\n\n")
    body = np.full((10, 20, 24), -100, "<i2").tobytes()
    lines = header.split("\n")
    for i in range(30):
        mutated = list(lines)
        k = rng.randrange(1, 10)
        key = mutated[k].split(":")[0]
        mutated[k] = f"{key}: {rng.choice(junk)}"
        path = world["sandbox"] / f"damaged{i}.nrrd"
        path.write_bytes("\n".join(mutated).encode() + body)
        run(["embed", path, "--weights", world["enc"], "--out", tmp_path / f"r{i}.npy"], refuse=False)
        cases += 1
    mha = ("ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
           "TransformMatrix = 1 0 0 0 1 0 0 0 1\nOffset = 0 0 0\nElementSpacing = 8 8 8\nDimSize = 24 20 10\n"
           "ElementType = MET_SHORT\nElementDataFile = LOCAL\n")
    mlines = mha.strip("\n").split("\n")
    for i in range(20):
        mutated = list(mlines)
        k = rng.randrange(0, len(mutated) - 1)
        key = mutated[k].split("=")[0].strip()
        mutated[k] = f"{key} = {rng.choice(junk)}"
        path = world["sandbox"] / f"damaged{i}.mha"
        path.write_bytes(("\n".join(mutated) + "\n").encode() + body[: rng.choice([len(body), len(body) // 2])])
        run(["embed", path, "--weights", world["enc"], "--out", tmp_path / f"m{i}.npy"], refuse=False)
        cases += 1
    assert cases >= 80


def _rotation(rng) -> np.ndarray:
    q = np.array([rng.gauss(0, 1) for _ in range(4)])
    w, x, y, z = q / np.linalg.norm(q)
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                     [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                     [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


@pytest.mark.slow
def test_fuzz_geometry(run, world, tmp_path):
    """Random grids written as NRRD: spacing in 0.05-50 mm with orthonormal axes is read; anything else refused."""
    rng = random.Random(SEED + 3)
    body = np.full((10, 20, 24), -100, "<i2")
    body[3:7, 5:15, 6:18] = 40  # some tissue, so a valid grid gives a real embedding
    refused = read = 0
    for i in range(40):
        direction = _rotation(rng)
        spacing = np.array([rng.choice([0.3, 0.8, 1.5, 3.0, 5.0, 8.0]) for _ in range(3)])
        origin = np.array([rng.uniform(-300, 300) for _ in range(3)])
        kind = "valid" if i % 2 == 0 else rng.choice(["spacing", "shear", "origin"])
        if kind == "spacing":
            spacing[rng.randrange(3)] = rng.choice([1e-9, 0.01, 0.049, 50.5, 1e3, 1e9])
        elif kind == "shear":
            direction[:, 1] = direction[:, 1] + rng.choice([0.05, 0.2, 1.0]) * direction[:, 0]
            direction[:, 1] /= np.linalg.norm(direction[:, 1])
        elif kind == "origin":
            origin[rng.randrange(3)] = rng.choice([float("nan"), float("inf")])
        columns = direction * spacing
        vectors = " ".join("(" + ",".join(repr(float(v)) for v in columns[:, a]) + ")" for a in range(3))
        text = ("NRRD0004\ntype: short\ndimension: 3\nspace: left-posterior-superior\nsizes: 24 20 10\n"
                f"space directions: {vectors}\nkinds: domain domain domain\nendian: little\nencoding: raw\n"
                f"space origin: ({','.join(repr(float(v)) for v in origin)})\n\n")
        path = world["sandbox"] / f"grid{i}.nrrd"
        path.write_bytes(text.encode() + body.tobytes())
        r = run(["embed", path, "--weights", world["enc"], "--out", tmp_path / f"g{i}.npy"], refuse=kind != "valid")
        if kind == "valid":
            assert r.returncode == 0, (i, r)
            read += 1
        else:
            refused += 1
    assert refused == 20 and read == 20


INT_OPTIONS = [("embed", "--threads"), ("embed", "--batch-size"), ("segment", "--threads"), ("segment", "--batch-size"),
               ("saliency", "--mask-size"), ("saliency", "--steps"), ("saliency", "--batch-size"),
               ("saliency", "--threads"), ("query", "-k"), ("query", "--threads")]
FLOAT_OPTIONS = [("segment", "--max-memory-gb"), ("saliency", "--cube"), ("saliency", "--spacing")]
TEXT_OPTIONS = [("embed", "--point"), ("query", "--point"), ("query", "--box"), ("saliency", "--roi"),
                ("saliency", "--center")]
# ("--" is left out: argparse reads "--opt=--" as the end of options, i.e. the option not given.)
BAD_INTS = ["-1", "0", "-5", "nan", "inf", "1.5", "abc", "", " ", "1e3", "0x10", "2 2", "٣x", "-0", "+-1"]
BAD_FLOATS = ["-1", "0", "nan", "inf", "-inf", "1e999", "abc", "", "1,2", "-0.0", "1e-400"]
BAD_OVERLAPS = ["-1", "1", "1.5", "nan", "inf", "-inf", "abc", "", "-0.1", "1e999"]  # 0 <= overlap < 1
BAD_TEXT = ["nan,nan,nan", "inf,0,0", "1,2", "1,2,3,4", "a,b,c", "", ",,", "1e999,0,0", "1;2", "-nan,0,0,1,1,1"]


@pytest.mark.slow
def test_fuzz_cli_values(run, world, tmp_path):
    rng = random.Random(SEED + 4)
    index = tmp_path / "index"
    built = ctfm("index", "add", index, world["ct"], "--weights", world["enc"])
    assert built.returncode == 0, built
    base = {
        "embed": ["embed", world["ct"], "--weights", world["enc"], "--out", tmp_path / "e.npy"],
        "segment": ["segment", world["ct"], "--model", world["seg"], "--out", tmp_path / "s.nii.gz"],
        "saliency": ["saliency", world["ct"], "--weights", world["enc"], "--target", "point:0,0,0", "--method",
                     "gradient", "--out", tmp_path / "h.nii.gz"],
        "query": ["index", "query", index, world["ct"]],
    }
    cases = [(c, o, v) for c, o in INT_OPTIONS for v in rng.sample(BAD_INTS, 6)]
    cases += [(c, o, v) for c, o in FLOAT_OPTIONS for v in rng.sample(BAD_FLOATS, 6)]
    cases += [("saliency", "--overlap", v) for v in rng.sample(BAD_OVERLAPS, 6)]
    cases += [(c, o, v) for c, o in TEXT_OPTIONS for v in rng.sample(BAD_TEXT, 5)]
    cases += [("query", "--per-scan", v) for v in ("-1", "-7", "nan", "x")]
    cases += [("index-add", "--stride", v) for v in ("0", "-1", "1,2", "a", "nan", "0,0,0")]
    for command, option, value in cases:
        if command == "index-add":
            args = ["index", "add", tmp_path / "new-index", world["ct"], "--weights", world["enc"], f"{option}={value}"]
        else:
            args = list(base[command]) + [f"{option}={value}"]
        run(args)
    assert not (tmp_path / "new-index").exists()
    assert len(cases) >= 100

