"""Merge a trained adapter into its base model and export a plain transformers folder.

python export.py ckpt=outputs/runs/<run>                     # bf16 safetensors, checked
python export.py ckpt=outputs/runs/<run> export.dtype=float32
"""

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from lorafit.errors import exit_on_user_errors
from lorafit.eval.export import export
from lorafit.strict_config import exit_on_config_errors


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
@exit_on_user_errors
def main(cfg: DictConfig) -> None:
    export(cfg, HydraConfig.get().overrides.task)


if __name__ == "__main__":
    exit_on_config_errors(Path(__file__).parent / "conf", config_name="eval")
    main()
