"""Evaluation of safety self-evaluation: confidence methods vs the SafeConf fine-tune, metrics, selective
judgement with a guarantee, over-refusal, general ability, plots and the report.

`run_evaluation(config, data_spec, out_uri, model=None, adapter=None)` is the entry point (safeconf.evaluation.runner).
"""

from safeconf.evaluation.runner import run_evaluation

__all__ = ["run_evaluation"]
