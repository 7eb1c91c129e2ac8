"""results.json of an experiment (experiments/shared_data_run.py): per model and method the entries of its
metrics.json, the guard curve, and how the run was made (command, seeds, settings, sizes, wall time, machine)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from safeconf import io
from safeconf.config import Config


def guard_entry_point(out: str) -> dict:
    """One guard curve point: the held-out scores of its one method (adapter_token_prob; token_prob for the
    untrained model), overall and per data set."""
    (method, methods), = read_metrics(out)["methods"].items()
    return {"out": out, "method": method, "overall": methods.get("overall"), "by_source": methods.get("by_source"),
            "verdict_consistency": methods.get("verdict_consistency")}


def guard_entry(main_out: str, curve: dict) -> dict:
    """The guard stage's pool and training, and the held-out accuracy at each curve point (adapter_token_prob of
    the snapshot adapter on the base model: the guard model's option probability)."""
    summary = io.read_json(io.join(main_out, "guard", "guard_summary.json"))
    points = [{"examples": examples, **guard_entry_point(name)}
              for name, examples in sorted(curve.items(), key=lambda item: item[1])]  # by pool examples
    return {"pool": summary["pool"], "train": {k: summary["train"].get(k) for k in (
        "steps", "examples", "train_tokens", "tokens_per_s", "final_train_loss", "val_loss_per_epoch", "precision",
        "seconds")}, "curve": points}


def read_metrics(out: str) -> dict:
    return io.read_json(io.join(out, "eval", "metrics.json"))


def model_entry(out: str, description: str, fraction: float, sft_counts: dict, steps: dict) -> dict:
    metrics = read_metrics(out)
    train_summary = io.join(out, "train", "train_summary.json")
    summary = io.read_json(train_summary) if io.exists(train_summary) else {}
    return {
        "description": description, "train_fraction": fraction, "out": out, "sft": sft_counts,
        "train": {k: summary[k] for k in ("steps", "epochs", "examples", "train_tokens", "tokens_per_s",
                                         "median_step_tokens_per_s", "final_train_loss", "val_loss_per_epoch",
                                         "precision", "seconds") if k in summary},
        "methods": {m: e for m, e in metrics["methods"].items() if e.get("role") == "adapter"},
        "steps": steps,
    }


def environment(config: Config) -> dict:
    """What RESULTS.md must name beside its numbers: the code, the engine dtype that model.dtype resolved to on this
    machine, whether the CPU multiplies bf16 natively, the CPU."""
    import platform
    import subprocess

    from safeconf.models import cpu_has_bf16, engine_dtype

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                                  cwd=Path(__file__).parent).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {"commit": git("rev-parse", "HEAD"), "uncommitted_changes": bool(git("status", "--porcelain", "-uno")),
            "model_dtype": config.model.dtype, "engine_dtype_used": engine_dtype(config.model.dtype, on_gpu=False),
            "cpu_bf16": cpu_has_bf16(), "cpu": cpu, "cores": os.cpu_count()}


def assemble(args, argv, base: Config, selection: dict, summary: dict, main_out: str, base_out: str | None,
             guard_points: dict, guard_model: str, train: str, heldout: str, models: dict, steps: dict, out: Path,
             started: float) -> dict:
    """4. results.json: per model and method the metrics.json entries, and how the run was made."""
    main_metrics = read_metrics(main_out)
    return {
        "command": [sys.executable, *sys.argv] if argv is None else ["experiments/shared_data_run.py", *argv],
        "seeds": {"selection": args.seed, "mutation": base.mutation.seed, "sampling": base.sampling.seed,
                  "sft_split": base.sft.seed, "train": base.train.seed, "eval": base.eval.seed},
        "settings": args.recipe.settings + args.overrides,
        "sizes": {name: entry["questions"] for name, entry in selection.items()},
        "selection": selection,
        "pipeline": {k: summary.get(k) for k in summary if k != "config"},
        "baselines": {m: e for m, e in main_metrics["methods"].items() if e.get("role") == "base"},
        "base_model": {"methods": read_metrics(base_out)["methods"],
                       "general_ability": read_metrics(base_out).get("general_ability"),
                       "over_refusal": read_metrics(base_out).get("over_refusal")} if base_out else None,
        "guard": guard_entry(str(out / "main"), guard_points) if guard_points else None,
        "calibration": {"sets": list(args.recipe.calibration_sets), "train": train, "heldout": heldout} if guard_model else None,
        "model": {"name": guard_model or base.model.name, "guard_tuned": bool(guard_model)},
        "models": models,
        "general_ability": main_metrics.get("general_ability"),
        "over_refusal": main_metrics.get("over_refusal"),
        "estimators": main_metrics.get("estimators"),
        "notes": main_metrics.get("notes"),
        "warnings": main_metrics.get("warnings"),
        "steps": steps,
        "environment": io.read_json(str(out / "environment.json")),
        "wall_seconds": round(time.time() - started, 1),
    }
