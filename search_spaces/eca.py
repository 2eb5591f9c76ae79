"""ECA: FeDEx threshold, replay weight, dictionary size and sparsity, orthogonality
weight, adapter width, learning rate.

Ranges bracket the paper's BLIP-2 values (threshold 0.5, 0.3 on one benchmark; lambda
0.1; 7040 atoms, alpha 1.0; weight 1.0; widths 30 / 512; AdamW lr 1e-5 on OPT-2.7B,
larger for the tiny models of the quickstart, whose study narrows ``training.lr`` with
its own bounds if needed). The dictionary size is a multiple of the patch-embedding width
in the paper (7040 = 5 x 1408), and it is searched as that multiple
(``dictionary_factor``) so one space fits the tiny quickstart model (width 64) and
BLIP-2's ViT-g (1408) alike.
"""

from search_spaces._common import training_knobs


def space(trial):
    training_knobs(trial, lr=(1e-5, 1e-2), weight_decay=False)
    trial.suggest_float("method.fisher_threshold", 0.2, 0.8)
    trial.suggest_float("method.replay_weight", 0.01, 1.0, log=True)
    trial.suggest_categorical("method.dictionary_factor", [1.0, 2.0, 5.0, 10.0])
    trial.suggest_float("method.sparsity", 0.1, 2.0, log=True)
    trial.suggest_float("method.orth_weight", 0.1, 10.0, log=True)
    trial.suggest_categorical("method.adapter_attn_width", [8, 16, 30, 64])
