"""Evaluation of safety self-evaluation: confidence methods vs the SafeConf fine-tune, metrics, selective
judgement with a guarantee, over-refusal, general ability, plots and the report.

`safeconf.evaluation.runner.run_evaluation(config, data_spec, out_uri, model=None, adapter=None)` is the entry
point. The package imports none of its modules, so a module can import its siblings without a circle.
"""
