"""CIFAR-10, L2 PGD adversarial training (official whole-batch ball): eps in logspace(-5, 4, 30).

Run:      python -m experiments.run_config configs/cifar10_pgd.py --data-dir ~/tensorflow_datasets
          (prepare CIFAR-10 first on a machine with network: python -m pagjax.data download cifar10)
Smoke:    python -m experiments.run_config configs/cifar10_pgd.py --smoke   (CPU, offline digits, < 1 min)
Hardware: one GPU (H100/A100) or a Colab TPU; add --strategy loop if 30 vmapped ResNet-18s do not fit in memory.
Expect:   docs/theory.md §7: on/off change about 0.55 / 1.1 for the weakest models, crossover near
          eps = 1-2, alignment peak about 0.88 near eps = 1 at accuracy about 0.9, accuracy falling
          above eps = 300.
Cost:     10 PGD steps make each step about 11x a plain one: ~11 accelerator-hours per model,
          ~330 H100-hours for the 30 models (estimate, not measured).
"""
from configs.common import paper_config


def get_config(smoke: bool = False):
    """The paper's PGD sweep (or its CPU smoke variant)."""
    return paper_config("pgd", smoke)
