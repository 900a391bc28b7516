"""dynrank.train: the ``dynrank-train`` command, its models, data and training loop.

- :mod:`.cli` — argument parsing, presets (the paper's Table 7) and the main job;
- :mod:`.models` — ResNet20 (CIFAR), WRN-28-10, ResNet-50 for 64×64, a byte-level GPT;
- :mod:`.data`, :mod:`.augment`, :mod:`.corpus` — CIFAR-10/100 and Tiny ImageNet
  in their usual layouts, device-side augmentation, the standard-library text corpus;
- :mod:`.loop` — one training run with checkpoints and resume;
- :mod:`.report` — monitoring glue and the side-by-side table.

Importing this package imports nothing heavy; run ``dynrank-train --help``.
"""

__all__ = ["main"]


def main(argv=None):
    """Run ``dynrank-train`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    from .cli import main as cli_main
    return cli_main(argv)
