"""The whole SafeConf run in one job: `python jobs/full.py` locally, or on a cluster with
`ray job submit --working-dir . -- python jobs/full.py --config CONFIG`.

Stages so far: the data pipeline (questions -> mutations -> samples -> confidence -> fine-tuning set).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from safeconf.config import load_config
from safeconf.pipeline import run_pipeline


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (see `safeconf pipeline --help` for every key)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = load_config(args.config, args.overrides)
    summary = run_pipeline(config)
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=2, ensure_ascii=False))
    print(f"pipeline done: fine-tuning set in {config.out}/sft/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
