"""Merge a trained adapter into its base model and export a plain transformers folder.

python export.py ckpt=outputs/runs/<run>                     # bf16 safetensors, checked
python export.py ckpt=outputs/runs/<run> export.dtype=float32
"""

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from lorafit.errors import LorafitError
from lorafit.export import export
from lorafit.strict_config import exit_on_config_errors


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        export(cfg, HydraConfig.get().overrides.task)
    except LorafitError as error:
        logging.getLogger("lorafit").error("%s", error)
        sys.exit(2)


if __name__ == "__main__":
    exit_on_config_errors(Path(__file__).parent / "conf")
    main()
