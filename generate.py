"""Answer instructions with a trained adapter (or the base model), in the training template
(alpaca, the run's chat template, or none for a raw-text run).
The answers alone go to stdout; logs go to stderr.

    python generate.py ckpt=outputs/runs/<run> prompt="What is the capital of France?"
    python generate.py ckpt=outputs/runs/<run> prompts_file=questions.txt > answers.jsonl
    cat questions.jsonl | python generate.py ckpt=outputs/runs/<run> prompts_file=-
    python generate.py ckpt=outputs/runs/<run> chat=true      # a conversation (chat data)
    python generate.py ckpt=none experiment=quickstart prompt="Classify: great film!" \\
        eval.do_sample=true eval.temperature=0.7
"""

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from lorafit.console import lightning_logs_once, quiet_libraries
from lorafit.errors import ConfigError, exit_on_user_errors


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
@exit_on_user_errors
def main(cfg: DictConfig) -> None:
    asked = [cfg.prompt is not None, cfg.prompts_file is not None, bool(cfg.chat)]
    if sum(asked) != 1:
        raise ConfigError(
            'say what to answer, one way: prompt="..." (with input="..." if it has one), '
            "prompts_file=<file or -> (one instruction per line, or JSON lines), or chat=true"
        )
    # The libraries load here, after the console is set up: --help needs none of them.
    from lorafit.eval import answers
    from lorafit.eval.evaluation import generate, load_trained

    lightning_logs_once()
    # Read before the model loads: a bad file fails in a second, not after a minute.
    prompts = answers.read_prompts(str(cfg.prompts_file)) if cfg.prompts_file else None
    cfg, module, datamodule, _ = load_trained(cfg, HydraConfig.get().overrides.task)
    prompter = datamodule.prompter()  # the run's template: alpaca, its chat template, raw text

    def answer(prompt_ids: list[list[int]]) -> list[str]:
        return generate(
            module,
            prompter,
            prompt_ids,
            cfg.eval.max_new_tokens,
            cfg.eval.do_sample,
            cfg.eval.temperature,
            batch_size=cfg.eval.batch_size,
        )

    if prompts is not None:
        answers.answer_all(prompts, answer, prompter, sys.stdout)
    elif cfg.chat:
        answers.chat(answer, prompter, sys.stdin, sys.stdout, sys.stderr)
    else:
        (completion,) = answer([prompter.ask(str(cfg.prompt), str(cfg.input or ""))])
        print(completion)


if __name__ == "__main__":
    quiet_libraries()  # before the libraries load: some speak while being imported
    from lorafit.runs.locate import register_resolvers
    from lorafit.strict_config import exit_on_config_errors

    register_resolvers()  # the output folder follows ckpt (conf/eval.yaml)

    exit_on_config_errors(Path(__file__).parent / "conf", config_name="eval")
    main()
