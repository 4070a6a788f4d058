"""python launch/export.py CHECKPOINT OUT: write the online backbone of a checkpoint as a folder that
`timm.create_model("local-dir:OUT", pretrained=True)` loads (config.json, model.safetensors, README.md).
A method with several encoders (CMC) gets one such folder per encoder, OUT/NAME, and OUT/features.json,
from which launch/evaluate.py rebuilds the method's evaluation features."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pipeline.methods  # noqa: E402,F401  (registers the methods a checkpoint's configuration names)
from pipeline.checkpoint import CheckpointError, export_encoders  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="launch/export.py", description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", type=Path, help="a checkpoint folder (RUN/checkpoints/step-NNNNNNNN)")
    p.add_argument("out", type=Path)
    args = p.parse_args(argv)
    try:
        export_encoders(args.checkpoint, args.out)
    except (CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    folders = sorted(p.parent for p in args.out.glob("*/config.json")) or [args.out]
    for folder in folders:
        print(f"{folder}: timm.create_model('local-dir:{folder}', pretrained=True)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
