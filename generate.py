"""Answer one prompt with a trained adapter (or the base model), in the training template.

    python generate.py ckpt=outputs/runs/<run> prompt="What is the capital of France?"
    python generate.py ckpt=none experiment=quickstart prompt="Classify: great film!" \\
        input="" eval.do_sample=true eval.temperature=0.7
"""

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from lorafit.console import lightning_logs_once, quiet_libraries
from lorafit.errors import ConfigError, exit_on_user_errors


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
@exit_on_user_errors
def main(cfg: DictConfig) -> None:
    if cfg.prompt is None:
        raise ConfigError('give the instruction as prompt="..." (and optionally input="...")')
    # The libraries load here, after the console is set up: --help needs none of them.
    from lorafit.data.prompts import alpaca_prompt
    from lorafit.eval.evaluation import generate, load_trained

    lightning_logs_once()

    cfg, module, datamodule, _ = load_trained(cfg, HydraConfig.get().overrides.task)
    prompt = alpaca_prompt(str(cfg.prompt), str(cfg.get("input") or ""))
    (answer,) = generate(
        module,
        datamodule.tokenizer,
        [prompt],
        cfg.eval.max_new_tokens,
        cfg.eval.do_sample,
        cfg.eval.temperature,
    )
    print(answer)


if __name__ == "__main__":
    quiet_libraries()  # before the libraries load: some speak while being imported
    from lorafit.runs.locate import register_resolvers
    from lorafit.strict_config import exit_on_config_errors

    register_resolvers()  # the output folder follows ckpt (conf/eval.yaml)

    exit_on_config_errors(Path(__file__).parent / "conf", config_name="eval")
    main()
