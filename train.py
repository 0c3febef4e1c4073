"""Fine-tune a causal language model with LoRA or QLoRA.

python train.py experiment=quickstart          # offline, CPU, a few minutes
python train.py adapter=qlora data=alpaca_2k    # Mistral-7B QLoRA on alpaca_2k_test (GPU)
python train.py -m adapter.r=8,16,32 optimizer.lr=1e-4,2e-4   # a sweep
"""

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from lorafit.errors import LorafitError
from lorafit.strict_config import exit_on_config_errors
from lorafit.training import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        metrics = train(cfg)
    except LorafitError as error:  # the user's to fix: one line, no traceback
        logging.getLogger("lorafit").error("%s", error)
        sys.exit(2)
    # Sweepers minimise the returned value.
    return metrics.get("val/loss", metrics.get("train/loss"))


if __name__ == "__main__":
    exit_on_config_errors(Path(__file__).parent / "conf")
    main()
