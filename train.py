"""Fine-tune a causal language model with LoRA or QLoRA.

python train.py experiment=quickstart          # offline, CPU, a few minutes
python train.py adapter=qlora data=alpaca_2k    # Mistral-7B QLoRA on alpaca_2k_test (GPU)
python train.py -m adapter.r=8,16,32 optimizer.lr=1e-4,2e-4   # a sweep
"""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from lorafit.console import lightning_logs_once, quiet_libraries
from lorafit.errors import exit_on_user_errors


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@exit_on_user_errors
def main(cfg: DictConfig) -> float | None:
    # The libraries load here, after the console is set up: --help needs none of them.
    from lorafit.training import train

    lightning_logs_once()

    metrics = train(cfg)
    # Sweepers minimise the returned value.
    return metrics.get("val/loss", metrics.get("train/loss"))


if __name__ == "__main__":
    quiet_libraries()  # before the libraries load: some speak while being imported
    from lorafit.strict_config import exit_on_config_errors

    exit_on_config_errors(Path(__file__).parent / "conf")
    main()
