"""Share a trained run on the Hugging Face Hub, with a generated model card.

python push.py ckpt=outputs/runs/<run> push.repo_id=<user>/<name>                 # the adapter
python push.py ckpt=outputs/runs/<run> push.repo_id=<user>/<name> push.what=merged  # export.py's
"""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from lorafit.console import quiet_libraries
from lorafit.errors import exit_on_user_errors


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
@exit_on_user_errors
def main(cfg: DictConfig) -> None:
    # The libraries load here, after the console is set up: --help needs none of them.
    from lorafit.eval.sharing import push

    print(push(cfg))


if __name__ == "__main__":
    quiet_libraries()  # before the libraries load: some speak while being imported
    from lorafit.runs.locate import register_resolvers
    from lorafit.strict_config import exit_on_config_errors

    register_resolvers()  # the output folder follows ckpt (conf/eval.yaml)

    exit_on_config_errors(Path(__file__).parent / "conf", config_name="eval")
    main()
