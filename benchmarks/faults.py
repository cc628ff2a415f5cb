"""Faults and bad input against the real command line (issue 19): a SIGKILL campaign and a table of fault kinds.

Part 1, the kill campaign: a 3-epoch digits run with ``--save-interval 4`` is SIGKILLed ``--kills`` times (20) at
random instants from a seeded schedule, each kill followed by ``gcvimoe train ... --resume auto`` with the same flags
until the run finishes; then the next run starts afresh. Kill kinds:

- ``step``: a random delay after a step line;
- ``save``: the run folder is polled every ~1 ms for a ``.*.tmp`` file and the process killed the moment one appears;
- ``final``: a random delay after the first step line of epoch 3/3;
- ``end``: a random delay after the final epoch's line, inside the end-of-run saves (best.pth, summary.csv, plots,
  the model folder).

A kill is only sent after the restarted process has logged at least one new step line, so every restart makes
progress. What was on disk at the kill (temporary files, the position last.pth holds) is recorded. Every finished run
is compared with an uninterrupted run of the same flags: last.pth's weights and optimiser state bit for bit,
best.pth's weights, the model folder, summary.csv except its timing column, every ``.pth`` loadable, the same files,
and no temporary file left.

Part 2, the fault table: each fault kind is one run of the CLI (or a short scripted scenario) in a folder of its own.
Recorded: the exit code, the ``error:`` lines, whether anything printed a traceback, and whether anything was lost
(a file that loaded before no longer loads or changed when it should not, a temporary file left behind, an unreadable
image not listed, a malicious pickle executed, a resumed run that differs from the uninterrupted one).

    .venv/bin/python benchmarks/faults.py                    # both parts, results in runs/faults and RESULTS.md
    .venv/bin/python benchmarks/faults.py --kills 0 --cases 'predict|validate'   # a subset of the table only
"""
import argparse
import csv
import hashlib
import io
import json
import os
import pickle
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from _common import machine, write_section

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
FLAGS = ["--model-kwargs", "{embed_dim: 16}", "--img-size", "16", "--batch-size", "48", "--epochs", "3",
         "--warmup-epochs", "1", "--threads", "1", "--workers", "0", "--no-tensorboard", "--num-experts", "4",
         "--save-interval", "4", "--hflip", "0.5"]
# one epoch on the small image folder: the fault runs that have to train
QUICK = ["--model-kwargs", "{embed_dim: 16}", "--img-size", "16", "--batch-size", "32", "--epochs", "1",
         "--warmup-epochs", "0", "--threads", "1", "--workers", "0", "--no-tensorboard", "--num-experts", "4"]
KILL_PLAN = {"step": 7, "save": 5, "final": 4, "end": 4}  # scaled to --kills
STEP_LINE = re.compile(r"^step\s+\d+/\d+ epoch (\d+)/(\d+)", re.M)
ERROR_LINE = re.compile(r"^(error: |gcvimoe[\w ]*: error: )")
TIMING_COLUMNS = {"images_per_s"}
RANK_EXIT = re.compile(r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s*exitcode\s*:\s*(-?\d+)")  # torchrun's report


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="runs/faults/results.json", help="results file (its folder holds the runs)")
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs in the campaign (0 = skip part 1)")
    parser.add_argument("--seed", type=int, default=19, help="seed of the kill schedule")
    parser.add_argument("--cases", default="", help="only the fault cases whose name matches this regex")
    parser.add_argument("--jobs", type=int, default=2, help="fault cases run at once (timing is not measured)")
    parser.add_argument("--no-report", action="store_true", help="do not rewrite benchmarks/RESULTS.md")
    parser.add_argument("--inner", nargs=2, metavar=("SCENARIO", "DIR"), help=argparse.SUPPRESS)
    return parser.parse_args()


# --- processes and files


def gcvimoe(*args) -> List[str]:
    return [PY, "-m", "gcvimoe", *map(str, args)]


def env() -> Dict[str, str]:
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def start(cmd: Sequence[str], log: Path) -> subprocess.Popen:
    """Start a command in its own process group with stdout in ``log``.out and stderr in ``log``.err."""
    return subprocess.Popen(list(cmd), stdout=open(f"{log}.out", "w"), stderr=open(f"{log}.err", "w"), env=env(),
                            cwd=ROOT, start_new_session=True)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 300) -> Tuple[object, str, str]:
    """Wait for a started command: (exit code or 'hang', stdout, stderr)."""
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc, signal.SIGKILL)
        proc.wait()
        code = "hang"
    return code, Path(f"{log}.out").read_text(), Path(f"{log}.err").read_text()


def run(cmd: Sequence[str], log: Path, timeout: float = 300) -> Tuple[object, str, str]:
    return finish(start(cmd, log), log, timeout)


def kill_group(proc: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(proc.pid, signum)
    except ProcessLookupError:
        pass


def wait_for(path: Path, pattern: re.Pattern, proc: subprocess.Popen, after: int = 0, timeout: float = 300):
    """Poll ``path`` until ``pattern`` matches after its first ``after`` matches; None when the process ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text() if path.exists() else ""
        found = list(pattern.finditer(text))
        if len(found) > after:
            return found[after]
        if proc.poll() is not None:
            return None
        time.sleep(0.01)
    return None


def temp_state(folder: Path) -> Dict[str, Tuple[int, int]]:
    """Name -> (inode, ctime) of every temporary file or folder: a file being written, or written anew, changes."""
    found = {}
    for name in temp_files(folder):
        try:
            stat = os.stat(folder / name)
            found[name] = (stat.st_ino, stat.st_ctime_ns)
        except FileNotFoundError:
            pass
    return found


def temp_files(folder: Path) -> List[str]:
    """Leftovers of an interrupted write: names starting with '.' and ending .tmp or .old, anywhere below."""
    found = []
    for parent, dirs, files in os.walk(folder):
        for name in dirs + files:
            if name.startswith(".") and name.endswith((".tmp", ".old")):
                found.append(os.path.relpath(os.path.join(parent, name), folder))
    return sorted(found)


def digest(path: Path) -> Dict[str, str]:
    """Relative path -> sha256 of every file under ``path`` (or of ``path`` itself)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()) if path.exists() else []
    return {str(p.relative_to(path) if p != path else p.name): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in files}


def loads(path: Path) -> bool:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            load_file(path)
        else:
            torch.load(path, map_location="cpu", weights_only=True)
        return True
    except Exception:
        return False


def loadable(folder: Path) -> List[Path]:
    return [p for p in sorted(folder.rglob("*")) if p.suffix in (".pth", ".safetensors") and p.is_file() and loads(p)]


def error_lines(stderr: str) -> List[str]:
    return [line for line in stderr.splitlines() if ERROR_LINE.match(line)]


def has_traceback(*texts: str) -> bool:
    return any("Traceback (most recent call last)" in text for text in texts)


# --- comparing runs


def same(a, b) -> bool:
    """Bitwise equality of nested checkpoint contents (tensors by torch.equal and dtype)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def load(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True)


def summary_rows(path: Path) -> List[Dict[str, str]]:
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in csv.DictReader(f)]


def file_set(folder: Path) -> List[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def end_checks(run_dir: Path, ref: Path) -> Dict[str, bool]:
    """The checks every finished run of the campaign must pass against the uninterrupted reference."""
    checks = {}
    try:
        last, ref_last = load(run_dir / "last.pth"), load(ref / "last.pth")
        checks["last.pth weights bitwise equal"] = same(last["state_dict"], ref_last["state_dict"])
        checks["last.pth optimiser state bitwise equal"] = same(last["optimizer"], ref_last["optimizer"])
    except Exception:
        checks["last.pth weights bitwise equal"] = checks["last.pth optimiser state bitwise equal"] = False
    try:
        checks["best.pth weights equal"] = same(load(run_dir / "best.pth")["state_dict"],
                                                load(ref / "best.pth")["state_dict"])
    except Exception:
        checks["best.pth weights equal"] = False
    checks["model/model.safetensors equal"] = (digest(run_dir / "model" / "model.safetensors")
                                               == digest(ref / "model" / "model.safetensors"))
    try:
        checks["summary.csv equal but images_per_s"] = summary_rows(run_dir / "summary.csv") == summary_rows(
            ref / "summary.csv")
    except OSError:
        checks["summary.csv equal but images_per_s"] = False
    weights = [p for p in run_dir.rglob("*") if p.suffix in (".pth", ".safetensors") and p.is_file()]
    checks["every .pth/.safetensors loads"] = all(loads(p) for p in weights)
    checks["no temporary file left"] = not temp_files(run_dir)
    checks["same files as the reference"] = file_set(run_dir) == file_set(ref)
    return checks


# --- part 1: the kill campaign


def kill_schedule(kills: int, rng: random.Random) -> List[str]:
    total = sum(KILL_PLAN.values())
    plan = [kind for kind, n in KILL_PLAN.items() for _ in range(round(n * kills / total))]
    plan = (plan + ["step"] * kills)[:kills]
    rng.shuffle(plan)
    return plan


def aim(kind: str, proc: subprocess.Popen, out: Path, run_dir: Path, rng: random.Random, leftovers: Dict):
    """Wait for the instant a kill of ``kind`` is due; returns a description of the trigger, or None when the process
    ended first. Every kind first waits for a step line of this process (progress since the restart)."""
    if wait_for(out, STEP_LINE, proc) is None:
        return None
    if kind == "save":
        return aim_at_write(proc, run_dir, rng, leftovers, 1)
    if kind == "end":  # the saves after the final epoch's last step: best, last, summary, plots, model folder
        if wait_for(out, re.compile(r"^step\s+(\d+)/\1 epoch 3/3", re.M), proc) is None:
            return None
        return aim_at_write(proc, run_dir, rng, leftovers, rng.randint(1, 6))
    if kind == "final" and wait_for(out, re.compile(r"^step\s+\d+/\d+ epoch 3/3", re.M), proc) is None:
        return None
    delay = rng.uniform(0, {"step": 2.5, "final": 3.0}[kind])
    return f"{delay:.2f} s after the trigger line" if pause(delay, proc) else None


def aim_at_write(proc: subprocess.Popen, run_dir: Path, rng: random.Random, leftovers: Dict, nth: int):
    """Wait until the ``nth`` write from now starts (a temporary file appears), then half the time a few ms more."""
    writing = set(being_written(run_dir, leftovers))
    started = 0
    while proc.poll() is None:
        now = set(being_written(run_dir, leftovers))
        started, writing = started + len(now - writing), now
        if started >= nth:
            delay = rng.choice((0.0, rng.uniform(0.001, 0.04)))
            if not pause(delay, proc):
                return None
            which = f"write {nth} after the final step began" if nth > 1 else "a temporary file appeared"
            return f"{delay * 1000:.0f} ms after {which}" if delay else f"the moment {which}"
        time.sleep(0.001)
    return None


def pause(seconds: float, proc: subprocess.Popen) -> bool:
    """Sleep, waking every ms; False when the process ended meanwhile."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        time.sleep(0.001)
    return proc.poll() is None


def being_written(run_dir: Path, leftovers: Dict) -> List[str]:
    """The temporary files of writes in progress (not those an earlier kill left, unchanged since)."""
    return sorted(name for name, key in temp_state(run_dir).items() if leftovers.get(name) != key)


def on_disk(run_dir: Path, ref: Path, leftovers: Dict) -> str:
    """What a kill left: the temporary files (bytes written of the finished file's size) and where last.pth is."""
    parts = []
    for name in temp_files(run_dir):
        path, final = run_dir / name, ref / Path(name).with_name(Path(name).name[1:-4])
        size = f"{path.stat().st_size / 1e6:.1f} of {final.stat().st_size / 1e6:.1f} MB" if path.is_file() and \
            final.is_file() else "a folder" if path.is_dir() else f"{path.stat().st_size / 1e6:.1f} MB"
        old = name not in being_written(run_dir, leftovers)
        parts.append(f"{name} ({size}{', left by the previous kill' if old else ''})")
    last = run_dir / "last.pth"
    try:
        state = load(last) if last.exists() else None
        parts.append("no last.pth yet" if state is None else f"last.pth at the end of epoch {state['epoch']}"
                     if not state.get("batch") else f"last.pth in epoch {state['epoch'] + 1} after batch "
                     f"{state['batch']}")
    except Exception:
        parts.append("last.pth UNREADABLE")
    return "; ".join(parts)


def last_line(out: Path) -> str:
    lines = [line for line in out.read_text().splitlines() if line.strip()] if out.exists() else []
    return lines[-1][:90] if lines else "(nothing printed)"


def kill_campaign(work: Path, ref: Path, kills: int, seed: int) -> Dict:
    rng = random.Random(seed)
    plan = kill_schedule(kills, rng)
    records, runs, attempts = [], [], []
    run_index, attempt, run_dir = 0, 0, None
    while plan or run_dir is not None:
        if run_dir is None:
            run_index += 1
            run_dir, attempt = work / f"run{run_index}", 0
        attempt += 1
        log = work / f"run{run_index}.attempt{attempt}"
        leftovers = temp_state(run_dir) if run_dir.exists() else {}
        cmd = gcvimoe("train", *FLAGS, "--output", run_dir, *(["--resume", "auto"] if attempt > 1 else []))
        proc = start(cmd, log)
        out = Path(f"{log}.out")
        trigger = aim(plan[0], proc, out, run_dir, rng, leftovers) if plan else None
        if trigger is not None:
            kill_group(proc, signal.SIGKILL)
        code, stdout, stderr = finish(proc, log)
        attempts.append({"run": run_index, "attempt": attempt, "exit": code, "killed": trigger is not None,
                         "traceback": has_traceback(stdout, stderr), "errors": error_lines(stderr)})
        if trigger is not None:
            records.append({"run": run_index, "attempt": attempt, "kind": plan.pop(0), "trigger": trigger,
                            "last_line": last_line(out), "on_disk": on_disk(run_dir, ref, leftovers),
                            "writing": being_written(run_dir, leftovers)})
            print(f"kill {len(records)}: {records[-1]}", flush=True)
            continue
        runs.append({"run": run_index, "attempts": attempt, "exit": code,
                     "checks": end_checks(run_dir, ref) if code == 0 else {"finished": False}})
        print(f"run {run_index} finished: {runs[-1]}", flush=True)
        run_dir = None
        if code != 0:
            break  # a resume that fails is a finding; the report shows it
    return {"kills": records, "runs": runs, "attempts": attempts}


# --- part 2: fixtures


def png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int = 14000, height: int = 13000) -> bytes:
    """A small PNG whose header declares a huge image (a decompression bomb's shape)."""
    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(bytes(4096))) + chunk(b"IEND", b"")


def digit(i: int = 0) -> np.ndarray:
    from gcvimoe.data.digits import digits_split
    images, _ = digits_split("val")
    return np.kron(images[i], np.ones((4, 4), dtype=np.uint8))  # 32x32, so damage lands inside the pixel data


def bad_images() -> Dict[str, bytes]:
    good = png_bytes(Image.fromarray(digit(1)))
    jpeg = png_bytes(Image.fromarray(digit(2)), "JPEG")
    damaged = bytearray(good)
    damaged[60:100] = bytes(40)
    return {"corrupt.png": bytes(damaged), "truncated.png": good[:len(good) // 2],
            "truncated.jpg": jpeg[:len(jpeg) // 2], "empty.png": b"", "notes.png": b"not an image, a text file\n",
            "noise.png": b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, "bomb.png": bomb_png()}


def image_folder(root: Path, per_class: int = 12, val_per_class: int = 3) -> Path:
    """Digits as ``root/{train,val}/<digit>/<n>.png`` (120 train images: one bad file is under the 1 % limit)."""
    from gcvimoe.data.digits import digits_split
    for split, count in (("train", per_class), ("val", val_per_class)):
        images, labels = digits_split(split)
        for label in range(10):
            (root / split / str(label)).mkdir(parents=True, exist_ok=True)
            for n, index in enumerate(np.flatnonzero(labels == label)[:count]):
                Image.fromarray(images[index]).save(root / split / str(label) / f"{n}.png")
    return root


class Evil:
    """Pickled, it asks the loader to create a marker file: a loader that runs code would leave the marker."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def fixtures(work: Path, ref: Path) -> Dict[str, Path]:
    """The inputs shared by the fault cases: the reference run, a dense run, a clean image folder, plain files."""
    fx = work / "fixtures"
    fx.mkdir(parents=True, exist_ok=True)
    folder = image_folder(fx / "digits")
    dense = fx / "dense"
    if not (dense / "last.pth").exists():
        code, _, err = run(gcvimoe("train", *QUICK[:-2], "--num-experts", "0", "--output", dense), fx / "dense")
        assert code == 0, err
    torch.save(load(ref / "best.pth")["state_dict"], fx / "state_dict.pth")
    (fx / "junk.pth").write_bytes(random.Random(0).randbytes(50_000))
    marker = fx / "EXECUTED"
    torch.save({"state_dict": Evil(marker), "epoch": 1}, fx / "evil.pth")
    with open(fx / "evil_plain.pth", "wb") as f:
        pickle.dump(Evil(marker), f)
    good = fx / "images"
    good.mkdir(exist_ok=True)
    for i in range(3):
        Image.fromarray(digit(i)).save(good / f"{i}.png")
    return {"ref": ref, "dense": dense, "folder": folder, "fx": fx, "marker": marker, "images": good}


# --- part 2: the cases


@dataclass
class Case:
    fault: str
    argv: Optional[Callable[[Path, Dict], List[str]]] = None  # gcvimoe arguments in case folder d
    expect: Tuple[int, ...] = (2,)
    setup: Optional[Callable[[Path, Dict], None]] = None
    check: Optional[Callable[[Path, Dict, str], Optional[str]]] = None  # a loss, described, or None
    protect: Callable[[Path, Dict], List[Path]] = lambda d, ctx: []  # must stay byte-identical
    scenario: Optional[Callable[[Path, Dict], Dict]] = None  # runs itself; returns exit/stdout/stderr(/lost)
    wrap: Optional[Callable[[Path, Dict], List[str]]] = None  # a command prefix (a read-only mount)
    show: str = ""  # a regex for the line that says what gcvimoe did, when it is not the error line
    note: str = ""


def copy_run(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, dirs_exist_ok=False)


def salt(name: str, data: bytes, split: str = "train") -> Callable:
    def setup(d: Path, ctx: Dict) -> None:
        shutil.copytree(ctx["folder"], d / "data")
        (d / "data" / split / "3" / name).write_bytes(data)
    return setup


def listed_exactly(name: str, split: str = "train") -> Callable:
    """The bad file must be listed in bad_files.txt, and nothing else."""
    def check(d: Path, ctx: Dict, output: str) -> Optional[str]:
        listing = d / "run" / "bad_files.txt"
        paths = [line.split("\t")[0] for line in listing.read_text().splitlines()] if listing.exists() else []
        want = [str(d / "data" / split / "3" / name)]
        return None if paths == want else f"bad_files.txt lists {paths or 'nothing'}, not {name}"
    return check


def trains_clean(image: Image.Image, name: str, what: str) -> Case:
    """An unusual but valid image: the run trains, lists nothing, and reads it as its 8-bit version."""
    def check(d: Path, ctx: Dict, output: str) -> Optional[str]:
        from gcvimoe.data import load_image
        if (d / "run" / "bad_files.txt").exists():
            return "listed as unreadable"
        got = np.asarray(load_image(d / "data" / "train" / "3" / name, "L"), dtype=int)
        diff = np.abs(got - digit(5).astype(int)).max()
        return None if diff <= 1 else f"read {diff} grey levels away from the 8-bit image"
    return Case(what, lambda d, c: ["train", *QUICK, "--data-dir", d / "data",
                                                               "--output", d / "run"],
                expect=(0,), setup=salt(name, png_bytes(image, "TIFF" if name.endswith(".tif") else "PNG")),
                check=check, show=r"^epoch\s+1/1 .*")


def bad_image_case(name: str, data: bytes, what: str, split: str = "train") -> Case:
    # val/ holds 30 images: one bad file is 3 %, over the default 1 % limit
    limit = ["--max-bad-fraction", "0.05"] if split == "val" else []
    return Case(f"{what} in {split}/" + " (--max-bad-fraction 0.05)" * bool(limit),
                lambda d, c: ["train", *QUICK, *limit, "--data-dir", d / "data", "--output", d / "run"],
                expect=(0,), setup=salt(name, data, split), check=listed_exactly(name, split),
                show=r"^skipping unreadable image .*")


def data_cases() -> List[Case]:
    def folder(d, c):
        return ["train", *QUICK, "--data-dir", d / "data", "--output", d / "run"]

    def with_data(edit):
        def setup(d, c):
            shutil.copytree(c["folder"], d / "data")
            edit(d / "data")
        return setup

    bad = bad_images()
    d16 = digit(5).astype(np.uint16) * 257
    return [
        Case("--data-dir missing", lambda d, c: ["train", *QUICK, "--data-dir", d / "nowhere", "--output", d / "run"]),
        Case("--data-dir naming a file", lambda d, c: ["train", *QUICK, "--data-dir", c["fx"] / "junk.pth",
                                                       "--output", d / "run"]),
        Case("data folder without val/", folder, setup=with_data(lambda r: shutil.rmtree(r / "val"))),
        Case("empty class folder in train/", folder, expect=(0, 2),
             setup=with_data(lambda r: (r / "train" / "x").mkdir())),
        Case("val class missing from train/", folder, setup=with_data(lambda r: shutil.copytree(
            r / "val" / "9", r / "val" / "extra"))),
        Case("stray README.txt in a class folder", folder, expect=(0,), show=r"^epoch\s+1/1 .*",
             setup=with_data(lambda r: (r / "train" / "3" / "README.txt").write_text("notes"))),
        bad_image_case("corrupt.png", bad["corrupt.png"], "corrupt PNG (damaged pixel data)"),
        bad_image_case("truncated.png", bad["truncated.png"], "truncated PNG"),
        bad_image_case("truncated.jpg", bad["truncated.jpg"], "truncated JPEG"),
        bad_image_case("empty.png", bad["empty.png"], "zero-byte .png"),
        bad_image_case("notes.png", bad["notes.png"], "text file named .png"),
        bad_image_case("noise.png", bad["noise.png"], "PNG signature then noise"),
        bad_image_case("bomb.png", bad["bomb.png"], "decompression-bomb header (176 B, 14000x13000)"),
        bad_image_case("empty.png", bad["empty.png"], "zero-byte .png", split="val"),
        trains_clean(Image.fromarray(d16), "sixteen.png", "16-bit grey PNG (should train)"),
        trains_clean(Image.fromarray(d16), "sixteen.tif", "16-bit grey TIFF (should train)"),
        trains_clean(Image.fromarray(digit(5).astype(np.float32) / 255.0), "float.tif",
                     "float TIFF in [0, 1] (should train)"),
        Case("3 bad of 123 images (over --max-bad-fraction 0.01)", folder, setup=salt_many(bad, 3)),
        Case("--strict-data with one bad image", lambda d, c: [*folder(d, c), "--strict-data"],
             setup=salt("corrupt.png", bad["corrupt.png"])),
        Case("--check-data with one bad image", lambda d, c: [*folder(d, c), "--check-data"], expect=(0,),
             setup=salt("corrupt.png", bad["corrupt.png"]), check=listed_exactly("corrupt.png"),
             show=r".*corrupt\.png.*"),
    ]


def salt_many(bad: Dict[str, bytes], count: int) -> Callable:
    def setup(d: Path, ctx: Dict) -> None:
        shutil.copytree(ctx["folder"], d / "data")
        for name in list(bad)[:count]:
            (d / "data" / "train" / "3" / name).write_bytes(bad[name])
    return setup


def config_cases() -> List[Case]:
    def train(*extra):
        return lambda d, c: ["train", *FLAGS, *extra, "--output", d / "run"]

    def yaml_file(text):
        return lambda d, c: (d / "recipe.yaml").write_text(text)

    return [
        Case("unknown flag (--lrr)", train("--lrr", "0.1")),
        Case("wrong type (--batch-size abc)", train("--batch-size", "abc")),
        Case("--lr nan", train("--lr", "nan")),
        Case("negative batch size", train("--batch-size", "-4")),
        Case("--top-k 5 with 4 experts", train("--top-k", "5")),
        Case("--save-interval 5x", train("--save-interval", "5x")),
        Case("--save-interval 2.5 (fractional steps)", train("--save-interval", "2.5")),
        Case("-c unknown config name", train("-c", "digitz")),
        Case("-c YAML with an unknown key", lambda d, c: ["train", "-c", d / "recipe.yaml", "--output", d / "run"],
             setup=yaml_file("epochs: 1\nlearning_rate: 0.1\n")),
        Case("-c YAML that does not parse", lambda d, c: ["train", "-c", d / "recipe.yaml", "--output", d / "run"],
             setup=yaml_file("epochs: [1\n")),
        Case("--model-kwargs that does not parse", train("--model-kwargs", "{embed_dim: ")),
        Case("--model unknown", train("--model", "gcvimoe_huge")),
        Case("--max-bad-fraction 1.5", train("--max-bad-fraction", "1.5")),
        Case("--dist-timeout soon", train("--dist-timeout", "soon")),
    ]


def checkpoint_cases() -> List[Case]:
    def resume(path_of):
        return lambda d, c: ["train", *FLAGS, "--resume", path_of(d, c), "--output", d / "run"]

    def marker_absent(d, c, output):
        return "THE PICKLE RAN CODE" if c["marker"].exists() else None

    def truncate_last(d, c):
        copy_run(c["ref"], d / "run")
        data = (d / "run" / "last.pth").read_bytes()
        (d / "run" / "last.pth").write_bytes(data[:len(data) // 2])

    def killed_before_first_save(d, c):
        (d / "run").mkdir()
        for name in ("config.yaml", "train.log"):
            shutil.copy(c["ref"] / name, d / "run" / name)
        (d / "run" / ".last.pth.tmp").write_bytes(b"")

    def equals_reference(d, c, output):
        failed = [name for name, ok in end_checks(d / "run", c["ref"]).items() if not ok]
        return ", ".join(failed) or None

    def without_last(d, c):
        copy_run(c["ref"], d / "run")
        (d / "run" / "last.pth").unlink()

    run_dir = lambda d, c: [d / "run"]  # noqa: E731
    return [
        Case("--resume auto after a kill before the first last.pth", lambda d, c: [
            "train", *FLAGS, "--resume", "auto", "--output", d / "run"], expect=(0,), setup=killed_before_first_save,
             check=equals_reference, show=r"^resume auto: .*"),
        Case("--resume auto in a finished run whose last.pth was deleted", lambda d, c: [
            "train", *FLAGS, "--resume", "auto", "--output", d / "run"], setup=without_last, protect=run_dir),
        Case("--resume a missing file", resume(lambda d, c: d / "missing.pth")),
        Case("--resume junk bytes", resume(lambda d, c: c["fx"] / "junk.pth")),
        Case("--resume a torch file holding a code-running pickle", resume(lambda d, c: c["fx"] / "evil.pth"),
             check=marker_absent),
        Case("validate a plain pickle that runs code", lambda d, c: ["validate", "--checkpoint",
                                                                      c["fx"] / "evil_plain.pth"], check=marker_absent),
        Case("predict with a code-running checkpoint", lambda d, c: ["predict", "--checkpoint", c["fx"] / "evil.pth",
                                                                     c["images"]], check=marker_absent),
        Case("--resume a checkpoint of another model (dense)", resume(lambda d, c: c["dense"] / "last.pth")),
        Case("--resume best.pth (no optimiser state)", resume(lambda d, c: c["ref"] / "best.pth")),
        Case("--resume auto with a truncated last.pth", lambda d, c: ["train", *FLAGS, "--resume", "auto",
                                                                      "--output", d / "run"],
             setup=truncate_last, protect=run_dir),
        Case("validate a checkpoint of another model", lambda d, c: ["validate", "--model", "gcvimoe_xxtiny",
                                                                     "--checkpoint", c["fx"] / "state_dict.pth",
                                                                     "--dataset", "digits"]),
        Case("validate a plain state dict without --model",
             lambda d, c: ["validate", "--checkpoint", c["fx"] / "state_dict.pth"]),
        Case("validate --batch-size -5", lambda d, c: ["validate", "--checkpoint", c["ref"] / "best.pth",
                                                       "--batch-size", "-5"]),
        Case("predict --checkpoint naming a plain folder", lambda d, c: ["predict", "--checkpoint", c["images"],
                                                                         c["images"]]),
    ]


def device_output_cases() -> List[Case]:
    def train(*extra):
        return lambda d, c: ["train", *FLAGS, *extra]

    def overwritten(d, c, output):
        state = load(d / "run" / "last.pth")
        return None if state["epoch"] == 1 and not temp_files(d / "run") else "the replaced run is not whole"

    cuda = [] if not torch.cuda.is_available() else ["(a GPU is present: this case is not a fault here)"]
    return [
        Case("--device cuda without a GPU", train("--device", "cuda", "--output", "{d}/run"), note="; ".join(cuda)),
        Case("--device gpu", train("--device", "gpu", "--output", "{d}/run")),
        Case("--output naming a file", lambda d, c: ["train", *FLAGS, "--output", c["fx"] / "junk.pth"],
             protect=lambda d, c: [c["fx"] / "junk.pth"]),
        Case("--output below a file", lambda d, c: ["train", *FLAGS, "--output", c["fx"] / "junk.pth" / "run"]),
        Case("second run into a finished run's folder", train("--output", "{d}/run"),
             setup=lambda d, c: copy_run(c["ref"], d / "run"), protect=lambda d, c: [d / "run"]),
        Case("--overwrite a finished run", train("--epochs", "1", "--overwrite", "--output", "{d}/run"), expect=(0,),
             setup=lambda d, c: copy_run(c["ref"], d / "run"), check=overwritten, show=r"^best top-1.*",
             note="replaced as asked"),
        Case("read-only output folder (read-only bind mount)", train("--output", "{d}/ro/run"),
             setup=lambda d, c: (d / "ro").mkdir(), wrap=read_only("ro")),
        Case("--resume auto in a read-only run folder", train("--resume", "auto", "--output", "{d}/ro/run"),
             setup=copy_into("ro"), wrap=read_only("ro"), protect=lambda d, c: [d / "ro" / "run"]),
        Case("convert export into a read-only folder", lambda d, c: ["convert", "export", "--checkpoint",
                                                                     c["ref"] / "best.pth", "--output", d / "ro" / "m"],
             setup=lambda d, c: (d / "ro").mkdir(), wrap=read_only("ro")),
        Case("output on a 4 MB file system (no room for a checkpoint)", train("--output", "{d}/small/run"),
             setup=lambda d, c: (d / "small").mkdir(), wrap=tmpfs("small", "4m")),
        Case("disk full in the middle of a run (tmpfs filled)", scenario=full_disk, expect=(2,)),
    ]


def copy_into(sub: str) -> Callable:
    def setup(d: Path, ctx: Dict) -> None:
        (d / sub).mkdir()
        copy_run(ctx["ref"], d / sub / "run")
    return setup


MOUNTS_ALLOWED: Optional[bool] = None


def mounts_allowed() -> bool:
    global MOUNTS_ALLOWED
    if MOUNTS_ALLOWED is None:
        MOUNTS_ALLOWED = shutil.which("unshare") is not None and subprocess.run(
            ["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True).returncode == 0
    return MOUNTS_ALLOWED


def read_only(sub: str) -> Callable:
    """Run in a private mount namespace where ``d/sub`` is a read-only bind mount (root ignores chmod)."""
    script = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" "$0" && exec "$@"'
    return lambda d, c: ["unshare", "-m", "sh", "-c", script, str(d / sub)]


def tmpfs(sub: str, size: str) -> Callable:
    script = f'mount -t tmpfs -o size={size} tmpfs "$0" && exec "$@"'
    return lambda d, c: ["unshare", "-m", "sh", "-c", script, str(d / sub)]


def command_cases() -> List[Case]:
    def predict(*extra):
        return lambda d, c: ["predict", "--checkpoint", c["ref"] / "best.pth", *extra]

    def with_corrupt(d, c):
        shutil.copytree(c["images"], d / "images")
        (d / "images" / "broken.png").write_bytes(bad_images()["corrupt.png"])

    def names_broken(d, c, output):
        return None if "broken.png" in output else "the unreadable image is not named"

    onnx_ok = lambda d, c, output: None if loads_onnx(d / "m.onnx") and not temp_files(d) else "no whole m.onnx"  # noqa
    return [
        Case("predict a folder holding a corrupt image", predict("{d}/images"), expect=(0,), setup=with_corrupt,
             check=names_broken, show=r"broken\.png.*"),
        Case("predict --topk 0", predict("--topk", "0", "{images}")),
        Case("predict --topk -1", predict("--topk", "-1", "{images}")),
        Case("predict a folder with no images", predict("{d}/empty"), setup=lambda d, c: (d / "empty").mkdir()),
        Case("predict a missing file", predict("{d}/nothing.png")),
        Case("visualize a dense checkpoint", lambda d, c: ["visualize", "--checkpoint", c["dense"] / "best.pth",
                                                           "--output", d / "viz"]),
        Case("visualize --images with no files", lambda d, c: ["visualize", "--checkpoint", c["ref"] / "best.pth",
                                                               "--images", d / "empty", "--output", d / "viz"],
             setup=lambda d, c: (d / "empty").mkdir()),
        Case("convert onnx of a capacity-trained checkpoint", lambda d, c: ["convert", "onnx", "--checkpoint",
                                                                            c["ref"] / "best.pth", "--output",
                                                                            d / "m.onnx"],
             expect=(0,), check=onnx_ok, show=r"(?i).*dropless.*"),
        Case("convert export --output naming a file", lambda d, c: ["convert", "export", "--checkpoint",
                                                                    c["ref"] / "best.pth", "--output",
                                                                    c["fx"] / "junk.pth"],
             protect=lambda d, c: [c["fx"] / "junk.pth"]),
        Case("info --img-size 0", lambda d, c: ["info", "--model", "gcvimoe_nano", "--img-size", "0"]),
        Case("info --num-experts 3 --top-k 5", lambda d, c: ["info", "--model", "gcvimoe_nano", "--num-experts", "3",
                                                            "--top-k", "5"]),
        Case("demo --epochs 0", lambda d, c: ["demo", "--epochs", "0", "--output", d / "demo"]),
    ]


def loads_onnx(path: Path) -> bool:
    try:
        import onnx
        onnx.load(str(path))
        return True
    except Exception:
        return False


# --- scenarios: signals, a full disk, a frozen DDP worker


def stop_with(signum: int, d: Path, ctx: Dict, twice: bool = False, compare: bool = True) -> Dict:
    """Send ``signum`` in the middle of epoch 2; then the checkpoint must load and, resumed, end equal to the
    uninterrupted run (a second signal 5 ms later, for ``twice``, interrupts without waiting for the step)."""
    run_dir = d / "run"
    proc = start(gcvimoe("train", *FLAGS, "--output", run_dir), d / "first")
    wait_for(Path(f"{d / 'first'}.out"), re.compile(r"^step\s+1\d/\d+ epoch 2/3", re.M), proc)
    kill_group(proc, signum)
    if twice:
        time.sleep(0.005)
        kill_group(proc, signum)
    code, stdout, stderr = finish(proc, d / "first")
    result = {"exit": code, "stdout": stdout, "stderr": stderr, "lost": None}
    if temp_files(run_dir) or not loads(run_dir / "last.pth"):
        result["lost"] = "last.pth unreadable or a temporary file left"
    elif compare:
        again, out2, err2 = run(gcvimoe("train", *FLAGS, "--resume", "auto", "--output", run_dir), d / "resume")
        checks = end_checks(run_dir, ctx["ref"]) if again == 0 else {"resume exited 0": False}
        failed = [name for name, ok in checks.items() if not ok]
        result["lost"] = f"after --resume auto: {', '.join(failed)}" if failed else None
        result["traceback"] = has_traceback(out2, err2)
    return result


def full_disk(d: Path, ctx: Dict) -> Dict:
    """An 80 MB tmpfs as the output, filled up after the first mid-epoch save: the next save must fail with one line,
    keep the previous last.pth and leave no partial file; freed again, --resume auto must finish the run."""
    if not mounts_allowed():
        return {"skipped": "mounting a tmpfs is not allowed here"}
    (d / "disk").mkdir()
    script = 'mount -t tmpfs -o size=80m tmpfs "$0" && exec "$@"'
    code, stdout, stderr = run(["unshare", "-m", "sh", "-c", script, str(d / "disk"), PY, __file__, "--inner",
                                "full-disk", str(d / "disk")], d / "scenario", timeout=600)
    try:
        return json.loads(stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"exit": code, "stdout": stdout, "stderr": stderr, "lost": "the scenario did not report"}


def inner_full_disk(disk: Path) -> Dict:
    run_dir = disk / "run"
    proc = start(gcvimoe("train", *FLAGS, "--output", run_dir), disk.parent / "train")
    wait_for(Path(f"{disk.parent / 'train'}.out"), re.compile(r"^saved ", re.M), proc)
    try:
        with open(disk / "filler", "wb") as f:
            while True:
                f.write(bytes(1 << 20))
                f.flush()
    except OSError:
        pass
    code, stdout, stderr = finish(proc, disk.parent / "train")
    lost = []
    if not loads(run_dir / "last.pth"):
        lost.append("last.pth no longer loads")
    if temp_files(run_dir):
        lost.append(f"left {temp_files(run_dir)}")
    (disk / "filler").unlink()
    again, out2, err2 = run(gcvimoe("train", *FLAGS, "--resume", "auto", "--output", run_dir), disk.parent / "resume")
    failed = [k for k, ok in end_checks(run_dir, Path(os.environ["FAULTS_REF"])).items() if not ok] \
        if again == 0 else [f"--resume auto exited {again}: {err2.strip()[-200:]}"]
    lost += [f"after freeing the disk and resuming: {', '.join(failed)}"] if failed else []
    return {"exit": code, "stdout": stdout, "stderr": stderr, "lost": "; ".join(lost) or None,
            "traceback": has_traceback(out2, err2)}


def ddp_case(d: Path, ctx: Dict, signum: int) -> Dict:
    """torchrun with 2 gloo processes and --dist-timeout 10s; rank 1 gets ``signum`` (SIGSTOP: frozen) after the
    first step line. gcvimoe's processes' own output is separated from torchrun's with --log-dir/--redirects."""
    if not Path(TORCHRUN).exists():
        return {"skipped": "torchrun is not installed"}
    logs = d / "ranks"
    cmd = [TORCHRUN, "--nproc_per_node", "2", "--master_port", str(29400 + signum + random.randrange(400)),
           "--log-dir", str(logs), "--redirects", "3", "-m", "gcvimoe", "train", *FLAGS, "--dist-timeout", "10s",
           "--output", str(d / "run")]
    proc = start(cmd, d / "torchrun")
    rank0 = None
    deadline = time.monotonic() + 120
    while rank0 is None and time.monotonic() < deadline and proc.poll() is None:
        rank0 = next((p for p in logs.rglob("stdout.log") if p.parent.name == "0" and STEP_LINE.search(
            p.read_text())), None) if logs.exists() else None
        time.sleep(0.05)
    frozen = rank_pid(proc.pid, 1)
    os.kill(frozen, signum)
    stopped_at = time.monotonic()
    code, stdout, stderr = finish(proc, d / "torchrun", timeout=180)
    took = time.monotonic() - stopped_at
    try:
        os.kill(frozen, signal.SIGKILL)
    except ProcessLookupError:
        pass
    ranks = {p.parent.name: p.read_text() for p in logs.rglob("stderr.log")}
    ours = "\n".join(ranks.values())
    return {"exit": code, "stdout": "", "stderr": ours, "lost": None, "traceback": has_traceback(ours),
            "note": f"job ended {took:.0f} s after the {signal.Signals(signum).name}; exit codes "
                    f"{', '.join(f'rank {r}: {c}' for r, c in sorted(dict(RANK_EXIT.findall(stderr)).items())) or '?'}"
                    + ("; torchrun's own launcher printed its ChildFailedError traceback"
                       if has_traceback(stderr) else "")}


def rank_pid(parent: int, rank: int) -> int:
    children = subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True).stdout.split()
    for pid in children:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return int(pid)
    raise RuntimeError(f"no rank {rank} among {children}")


def signal_cases() -> List[Case]:
    return [
        Case("SIGTERM mid-epoch, then --resume auto", scenario=lambda d, c: stop_with(signal.SIGTERM, d, c),
             expect=(143,)),
        Case("SIGINT mid-epoch, then --resume auto", scenario=lambda d, c: stop_with(signal.SIGINT, d, c),
             expect=(130,)),
        Case("SIGUSR1 mid-epoch", scenario=lambda d, c: stop_with(signal.SIGUSR1, d, c, compare=False),
             expect=(138,)),
        Case("two SIGINTs 5 ms apart (Ctrl-C twice)",
             scenario=lambda d, c: stop_with(signal.SIGINT, d, c, twice=True, compare=False), expect=(130,)),
        Case("DDP (2 gloo processes): rank 1 frozen by SIGSTOP", scenario=lambda d, c: ddp_case(d, c, signal.SIGSTOP),
             expect=(1,)),
        Case("DDP (2 gloo processes): rank 1 SIGKILLed", scenario=lambda d, c: ddp_case(d, c, signal.SIGKILL),
             expect=(1,)),
    ]


def all_cases() -> List[Case]:
    return data_cases() + config_cases() + checkpoint_cases() + device_output_cases() + command_cases() \
        + signal_cases()


# --- part 2: running a case


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60]


def fill(argv: List, d: Path, ctx: Dict) -> List[str]:
    return [str(a).replace("{d}", str(d)).replace("{images}", str(ctx["images"])) for a in argv]


def what_it_did(case: Case, stdout: str, stderr: str) -> str:
    errors = error_lines(stderr)
    found = re.findall(f"(?m){case.show}", stdout + "\n" + stderr) if case.show else []
    lines = [line for line in (stdout + stderr).splitlines() if line.strip()]
    return errors[-1] if errors else found[0] if found else lines[-1] if lines else "(nothing printed)"


def shorten(text: str, d: Path, work: Path) -> str:
    """Paths in a message relative to the case's folder (or the work folder, for fixtures)."""
    return text.replace(f"{d}/", "").replace(f"{work}/", "")


def snapshot(paths: List[Path]) -> Dict[str, Dict[str, str]]:
    return {str(p): digest(p) for p in paths}


def run_case(case: Case, index: int, work: Path, ctx: Dict) -> Dict:
    d = work / "cases" / f"{index:02d}-{slug(case.fault)}"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    if (case.wrap or case.scenario is full_disk) and not mounts_allowed():
        return {"fault": case.fault, "skipped": "mount namespaces (unshare -m) are not allowed here"}
    if case.setup:
        case.setup(d, ctx)
    guarded = case.protect(d, ctx)
    before, loaded_before = snapshot(guarded), loadable(d)
    started = time.monotonic()
    if case.scenario:
        result = case.scenario(d, ctx)
        if "skipped" in result:
            return {"fault": case.fault, "skipped": result["skipped"]}
        code, stdout, stderr, lost = result["exit"], result["stdout"], result["stderr"], result.get("lost")
    else:
        code, stdout, stderr = run([*(case.wrap(d, ctx) if case.wrap else []), *gcvimoe(*fill(case.argv(d, ctx), d,
                                                                                             ctx))], d / "cli")
        lost = case.check(d, ctx, stdout + stderr) if case.check else None
        result = {}
    losses = [lost] if lost else []
    if snapshot(guarded) != before:
        losses.append("a protected file changed")
    losses += [f"{p.name} no longer loads" for p in loaded_before if not loads(p)]
    losses += [f"left {t}" for t in temp_files(d)]
    if ctx["marker"].exists():
        losses.append("THE PICKLE RAN CODE")
    errors = error_lines(stderr)
    return {"fault": case.fault, "exit": code, "expected": list(case.expect), "error_lines": len(errors),
            "did": shorten(what_it_did(case, stdout, stderr), d, work), "traceback": result.get("traceback", False)
            or has_traceback(stdout, stderr), "lost": "; ".join(losses) or None, "seconds": time.monotonic() - started,
            "note": "; ".join(filter(None, [case.note, result.get("note", "")]))}


def judge(row: Dict) -> bool:
    """As the issue asks: the expected exit code, one error line exactly when failing, no traceback, nothing lost."""
    if "skipped" in row:
        return True
    one_line = row["error_lines"] == (0 if row["exit"] == 0 else 1)
    return row["exit"] in row["expected"] and one_line and not row["traceback"] and not row["lost"]


def fault_table(work: Path, ref: Path, pattern: str, jobs: int) -> List[Dict]:
    ctx = fixtures(work, ref)
    cases = [(i, c) for i, c in enumerate(all_cases(), 1) if re.search(pattern, c.fault)]
    alone = [(i, c) for i, c in cases if c.scenario]  # timing-sensitive: one at a time, after the rest
    rows = {}
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        for (i, case), row in zip(cases, pool.map(lambda ic: None if ic[1].scenario else run_case(ic[1], ic[0], work,
                                                                                                  ctx), cases)):
            if row is not None:
                rows[i] = row
                print(f"case {i}: {row}", flush=True)
    for i, case in alone:
        rows[i] = run_case(case, i, work, ctx)
        print(f"case {i}: {rows[i]}", flush=True)
    return [dict(rows[i], ok=judge(rows[i])) for i, _ in cases]


# --- the report


def cell(text: str, width: int = 110) -> str:
    text = str(text).replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= width else text[:width - 1] + "…"


def kill_report(campaign: Dict) -> str:
    kills, runs, attempts = campaign["kills"], campaign["runs"], campaign["attempts"]
    by_kind = {kind: sum(k["kind"] == kind for k in kills) for kind in KILL_PLAN}
    writing = [k for k in kills if k["writing"]]
    final = [k for k in kills if k["kind"] in ("final", "end") or "epoch 3/3" in k["last_line"]]
    resumes = [a for a in attempts if a["attempt"] > 1]
    tracebacks = sum(a["traceback"] for a in attempts)
    lines = ["| | |", "|---|---|",
             f"| kills | {len(kills)}: " + ", ".join(f"{n} {kind}" for kind, n in by_kind.items()) + " |",
             f"| kills that found a temporary file being written | {len(writing)}: "
             + ", ".join(f"{n}x `{name}`" for name, n in count(n for k in writing for n in k["writing"]).items())
             + " |",
             f"| kills during saves or in the final epoch | {len({id(k) for k in writing + final})} |",
             f"| resumes (`--resume auto`) | {len(resumes)}, exits: "
             + ", ".join(f"{v}x {k}" for k, v in count(str(a['exit']) if not a['killed'] else 'killed'
                                                       for a in resumes).items()) + " |",
             f"| tracebacks in any attempt | {tracebacks} |",
             f"| finished runs | {len(runs)} |"]
    checks = list(runs[0]["checks"]) if runs else []
    for name in checks:
        passed = sum(bool(r["checks"].get(name)) for r in runs)
        lines.append(f"| {name} | {'pass' if passed == len(runs) else 'FAIL'} ({passed}/{len(runs)} runs) |")
    lines += ["", "| # | run | kind | trigger | last line before the kill | on disk at the kill |",
              "|---|---|---|---|---|---|"]
    for n, k in enumerate(kills, 1):
        lines.append(f"| {n} | {k['run']}.{k['attempt']} | {k['kind']} | {k['trigger']} | `{cell(k['last_line'], 70)}`"
                     f" | {cell(k['on_disk'])} |")
    return "\n".join(lines)


def count(items) -> Dict[str, int]:
    out: Dict[str, int] = {}
    for item in items:
        out[item] = out.get(item, 0) + 1
    return out


def fault_report(rows: List[Dict]) -> str:
    tried = [r for r in rows if "skipped" not in r]
    lines = [f"{len(tried)} fault kinds tried ({len(rows) - len(tried)} skipped): "
             f"{sum(r['traceback'] for r in tried)} tracebacks, {sum(bool(r['lost']) for r in tried)} losses, "
             f"{sum(not r['ok'] for r in tried)} not as expected.", "",
             "Paths are relative to the case's own folder. *1 line?*: stderr holds exactly one `error:` line (none for "
             "exit 0). *lost?*: a file that loaded before no longer loads, a protected file or folder changed, a "
             "temporary file was left, an unreadable image went unlisted or a good one was listed, the pickle's "
             "marker file appeared, or a run resumed after the fault differs from the uninterrupted one.", "",
             "| # | fault | what gcvimoe did | exit | 1 line? | traceback? | lost? |", "|---|---|---|---|---|---|---|"]
    for n, r in enumerate(rows, 1):
        if "skipped" in r:
            lines.append(f"| {n} | {cell(r['fault'])} | skipped: {r['skipped']} | | | | |")
            continue
        one = "yes" if r["error_lines"] == 1 else ("–" if r["exit"] == 0 and not r["error_lines"] else
                                                   f"NO ({r['error_lines']})")
        exit_text = str(r["exit"]) + ("" if r["exit"] in r["expected"] else f" (expected {r['expected']})")
        did = cell(r["did"], 150) + (f" *({cell(r['note'], 120)})*" if r["note"] else "")
        lines.append(f"| {n} | {cell(r['fault'])} | `{did}` | {exit_text} | {one} | "
                     f"{'YES' if r['traceback'] else 'no'} | {cell(r['lost']) if r['lost'] else 'no'} |")
    return "\n".join(lines)


def report(args, campaign: Optional[Dict], rows: List[Dict], seconds: float) -> str:
    command = "python benchmarks/faults.py" + (f" --kills {args.kills}" if args.kills != 20 else "") + (
        f" --cases '{args.cases}'" if args.cases else "")
    body = ["## Faults and bad input (benchmarks/faults.py, issue 19)", "", machine(), "",
            f"`{command}` ({seconds / 60:.1f} min, fault cases {args.jobs} at a time).", ""]
    if campaign:
        body += ["### SIGKILL campaign", "",
                 f"`gcvimoe train {' '.join(FLAGS)}` on the digits, SIGKILLed at random instants (seed {args.seed}), "
                 "each kill followed by the same command with `--resume auto` until the run finishes. Kinds: `step` "
                 "(0-2.5 s after a step line), `save` (the moment a `.*.tmp` file appears, polled every ms, or 1-40 ms "
                 "into its write), `final` (0-3 s after epoch 3's first step line), `end` (the same at the 1st to 6th "
                 "write after the final step: best.pth, last.pth, summary.csv, plots, model folder; the end-of-run "
                 "saves). Every kill waited for a step line of the restarted process. "
                 "Finished runs are compared with an uninterrupted run of the same flags.", "",
                 kill_report(campaign), ""]
    body += ["### Fault table", "", fault_report(rows)]
    return "\n".join(body)


def main():
    args = parse_args()
    if args.inner:
        print(json.dumps(inner_full_disk(Path(args.inner[1]))))
        return
    started = time.monotonic()
    output = Path(args.output).resolve()
    work = output.parent
    work.mkdir(parents=True, exist_ok=True)
    for stale in ("reference", "cases") + tuple(p.name for p in work.glob("run*")):
        shutil.rmtree(work / stale, ignore_errors=True)
    ref = work / "reference"
    code, _, err = run(gcvimoe("train", *FLAGS, "--output", ref), work / "reference")
    assert code == 0, err
    os.environ["FAULTS_REF"] = str(ref.resolve())
    campaign = kill_campaign(work, ref, args.kills, args.seed) if args.kills else None
    rows = fault_table(work, ref, args.cases, args.jobs)
    seconds = time.monotonic() - started
    output.write_text(json.dumps({"flags": FLAGS, "seed": args.seed, "campaign": campaign, "faults": rows,
                                  "seconds": seconds, "machine": machine()}, indent=1, default=str))
    body = report(args, campaign, rows, seconds)
    print(body)
    if not args.no_report:
        write_section("faults", body)


if __name__ == "__main__":
    main()
