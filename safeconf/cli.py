"""The `safeconf` console script: one subcommand per stage, one typed config (YAML + key=value overrides)."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from safeconf.config import describe_options, load_config
from safeconf.schema import DataFormatError


def _options_epilog() -> str:
    lines = ["config keys (set in --config YAML or as key=value overrides, e.g. sampling.k=8 engine.kind=vllm):"]
    for key, default, help_text in describe_options():
        lines.append(f"  {key} (default {default})\n      {help_text}")
    return "\n".join(lines)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file; key=value overrides apply on top of it")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. sampling.k=8")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="safeconf", description="Calibrated LLM safety self-evaluation on Ray.")
    stages = parser.add_subparsers(dest="stage", required=True)
    pipeline = stages.add_parser(
        "pipeline",
        help="questions -> mutations -> k samples -> self-consistency confidence -> fine-tuning set",
        description="Stream safety questions through Ray Data and write a confidence-labelled fine-tuning set: "
        "OUT/confidence/ (one row per question with its variants and samples), OUT/sft/{train,val}.parquet, "
        "OUT/rejects.parquet (rows refused at the door, with the reason) and OUT/summary.json.",
        epilog=_options_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pipeline.add_argument("--data", help="questions SPEC: a path, format:path or 'embedded' (default: embedded)")
    pipeline.add_argument("--out", help="output directory, local or s3:// / gs:// (default: runs/latest)")
    pipeline.add_argument("--limit", type=int, help="read at most N rows")
    _add_common(pipeline)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config, args.overrides, data=args.data, out=args.out, limit=args.limit)
    except (ValueError, OSError) as error:
        print(f"safeconf {args.stage}: {error}", file=sys.stderr)
        return 2
    if args.stage == "pipeline":
        from safeconf.pipeline import run_pipeline

        try:
            summary = run_pipeline(config)
        except (DataFormatError, FileNotFoundError, ValueError) as error:
            print(f"safeconf pipeline: {error}", file=sys.stderr)
            return 1
        shown = {k: v for k, v in summary.items() if k != "config"}
        print(json.dumps(shown, indent=2, ensure_ascii=False))
        print(f"wrote {config.out}/sft/train.parquet, {config.out}/sft/val.parquet and {config.out}/summary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
