"""LoRA fine-tuning of the judge on the SFT set: Ray Train (TorchTrainer) + DeepSpeed ZeRO 2/3 + PEFT.

    data    the SFT set: validation, tokenization, the streamed and length-grouped plan, batches, the loss
    worker  what each Ray Train worker runs: model + LoRA under DeepSpeed, steps, reports, checkpoints, export
    driver  run_training: validate, tokenize, start the run, publish OUT/adapter and OUT/train_summary.json
"""

from safeconf.train.driver import run_training, training_precision

__all__ = ["run_training", "training_precision"]
