"""Test-only: runs train.py with the original pipeline's gradient buckets (two overlapped 5e8-element
buckets) in place of config.deepspeed_buckets' trimmed ones, so that tests/test_pipeline.py can show
that trimming changes memory and nothing that is computed. Run under the DeepSpeed launcher like train.py."""

import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    import config

    config.deepspeed_buckets = lambda trainable, world_size: (config.ORIGINAL_BUCKET_ELEMENTS, True)
    sys.argv = ["train.py", *(a for a in sys.argv[1:] if not a.startswith("--local_rank"))]
    runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
