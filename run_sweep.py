"""roli_sweep: sweep-driven hyperparameter studies for adversarial transfer learning (RoLI).

    python run_sweep.py --space search_spaces/lora.yaml     # a study (the default command)
    python run_sweep.py export --name SWEEP --top-k 3 --out exported
    python run_sweep.py train --config exported/FILE.yaml
    python run_sweep.py pretrain --config roli_sweep/backbones/fmnist59_vit_robust.yaml
"""
import sys

from roli_sweep.cli import main

if __name__ == "__main__":
    sys.exit(main())
