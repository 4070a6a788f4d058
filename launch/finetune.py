"""python launch/finetune.py --backbone local-dir:FOLDER|CHECKPOINT --train SHARDS --val SHARDS --labels-per-class N

FeatMatch semi-supervised fine-tuning of a pretrained backbone; see pipeline/finetune.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import pipeline.methods  # noqa: E402,F401  (registers the methods a checkpoint's configuration names)
from pipeline.finetune import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
