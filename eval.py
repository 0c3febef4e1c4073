"""Evaluate a fine-tune: validation loss and perplexity, answers to held-out prompts scored by
exact match, ROUGE-L and (for label answers) accuracy / precision / recall / F1.

    python eval.py ckpt=outputs/runs/<run>                  # a run folder, adapter/ or .ckpt
    python eval.py ckpt=none experiment=quickstart           # the untrained base, for comparison
    python eval.py ckpt=outputs/runs/<run> eval.baseline=outputs/runs/<base-eval>/metrics.json

Writes metrics.json, report.md and PNG plots into its own run folder under outputs/runs/.
"""

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from lorafit.console import lightning_logs_once, quiet_libraries
from lorafit.errors import exit_on_user_errors


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
@exit_on_user_errors
def main(cfg: DictConfig) -> float | None:
    # The libraries load here, after the console is set up: --help needs none of them.
    from lorafit.eval.evaluation import evaluate

    lightning_logs_once()

    metrics = evaluate(cfg, HydraConfig.get().overrides.task)
    return metrics.get("val/loss")


if __name__ == "__main__":
    quiet_libraries()  # before the libraries load: some speak while being imported
    from lorafit.runs.locate import register_resolvers
    from lorafit.strict_config import exit_on_config_errors

    register_resolvers()  # the output folder follows ckpt (conf/eval.yaml)

    exit_on_config_errors(Path(__file__).parent / "conf", config_name="eval")
    main()
