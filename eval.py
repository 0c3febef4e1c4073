"""Evaluate a fine-tune: validation loss and perplexity, answers to held-out prompts scored by
exact match, ROUGE-L and (for label answers) accuracy / precision / recall / F1.

    python eval.py ckpt=outputs/runs/<run>                  # a run folder, adapter/ or .ckpt
    python eval.py ckpt=none experiment=quickstart           # the untrained base, for comparison
    python eval.py ckpt=outputs/runs/<run> eval.baseline=outputs/runs/<base-eval>/metrics.json

Writes metrics.json, report.md and PNG plots into its own run folder under outputs/runs/.
"""

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from lorafit.errors import LorafitError
from lorafit.evaluation import evaluate
from lorafit.strict_config import exit_on_config_errors


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        metrics = evaluate(cfg, HydraConfig.get().overrides.task)
    except LorafitError as error:  # the user's to fix: one line, no traceback
        logging.getLogger("lorafit").error("%s", error)
        sys.exit(2)
    return metrics.get("val/loss")


if __name__ == "__main__":
    exit_on_config_errors(Path(__file__).parent / "conf")
    main()
