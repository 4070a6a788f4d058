"""python -m data_shards.sample OUT: the embedded default dataset, built offline from scikit-learn's
handwritten digits (1,797 real 8x8 scans, 10 classes), upscaled to 32x32 RGB PNGs and written as labeled
shard sets OUT/train and OUT/val (20% of each class held out)."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from data_shards import create

SIDE = 32
VAL_FRACTION = 0.2


def write_digit_folder(root: Path) -> int:
    """One class folder per digit; returns the number of images."""
    from sklearn.datasets import load_digits  # ships its data inside the package: no network

    digits = load_digits()
    for i, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        grey = Image.fromarray((pixels * (255 / 16)).round().astype(np.uint8), "L")
        rgb = grey.resize((SIDE, SIDE), Image.Resampling.BICUBIC).convert("RGB")
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        rgb.save(folder / f"{i:04d}.png")
    return len(digits.images)


def build(out: Path, overwrite: bool = False) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        write_digit_folder(Path(tmp))
        argv = [tmp, str(out), "--val-fraction", str(VAL_FRACTION), "--workers", "1", "--seed", "0"]
        return create.main(argv + (["--overwrite"] if overwrite else []))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_shards.sample", description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="output folder; gets train/ and val/")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    return build(Path(args.out), args.overwrite)


if __name__ == "__main__":
    sys.exit(main())
