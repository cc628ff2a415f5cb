"""What several test files share: running the CLI in-process, the one-error-line check, a tiny image folder."""
import csv

import numpy as np
from PIL import Image

from gcvimoe.cli import main

CLASSES = ("circle", "square", "stripes")


def cli(capsys, *argv):
    """Run the CLI in this process; return (exit code, stdout, stderr). argparse errors exit through SystemExit."""
    capsys.readouterr()
    try:
        code = main(list(argv))
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_cli(capsys, *argv):
    """:func:`cli` without stdout: (exit code, stderr)."""
    code, _, err = cli(capsys, *argv)
    return code, err


def assert_one_error_line(code, err, *fragments):
    """A non-zero exit with exactly one ``error:`` line holding every fragment, and no traceback."""
    assert code != 0
    lines = [line for line in err.strip().splitlines() if line.strip()]
    error_lines = [line for line in lines if "error:" in line]
    assert len(error_lines) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in error_lines[0], error_lines[0]


def make_image_folder(root, train_per_class=6, val_per_class=3, classes=CLASSES):
    """Visually different classes of 20x20 RGB images, with per-image noise."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:20, :20]
    shapes = {
        "circle": ((yy - 10) ** 2 + (xx - 10) ** 2 < 40),
        "square": (abs(yy - 10) < 6) & (abs(xx - 10) < 6),
        "stripes": (xx // 3) % 2 == 0,
    }
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = shapes[name][..., None] * np.array([200, 120, 60]) + rng.integers(0, 50, (20, 20, 3))
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    return root


def read_summary(path):
    with open(path) as f:
        return list(csv.DictReader(f))
