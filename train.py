"""Train a DiT. Composes configs/train.yaml with Hydra; override anything on the command line:

    python train.py model=dit_b2 model.block=cross_attn
"""

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    model = instantiate(cfg.model)
    n = sum(p.numel() for p in model.parameters())
    print(f"{model.name} block={model.block}: {n / 1e6:.2f}M parameters, {model.num_tokens} tokens")
    raise SystemExit("the training loop is not implemented yet (issue 4)")


if __name__ == "__main__":
    main()
