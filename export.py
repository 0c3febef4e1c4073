"""Merge a trained adapter into its base model and export a plain transformers folder.

python export.py ckpt=outputs/runs/<run>                     # bf16 safetensors, checked
python export.py ckpt=outputs/runs/<run> export.dtype=float32
"""

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from lorafit.console import lightning_logs_once, quiet_libraries
from lorafit.errors import exit_on_user_errors


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
@exit_on_user_errors
def main(cfg: DictConfig) -> None:
    # The libraries load here, after the console is set up: --help needs none of them.
    from lorafit.eval.export import export

    lightning_logs_once()

    export(cfg, HydraConfig.get().overrides.task)


if __name__ == "__main__":
    quiet_libraries()  # before the libraries load: some speak while being imported
    from lorafit.runs.locate import register_resolvers
    from lorafit.strict_config import exit_on_config_errors

    register_resolvers()  # the output folder follows ckpt (conf/eval.yaml)

    exit_on_config_errors(Path(__file__).parent / "conf", config_name="eval")
    main()
