"""DIKI: prompt length and depth, and the learning rate of the prompts.

DIKI trains its prompts with plain SGD at a high rate (lr 5.0, cosine, weight decay 0, no
momentum, no gradient clipping), so this space fixes the optimizer to SGD without weight
decay and searches lr on a log scale around that value. Momentum and clipping are not
searched: they come from the study's ``training`` block (DIKI's are ``momentum: 0.0``,
``grad_clip: null``, as ``studies/mtil_dagr.yaml`` sets them).
Depth is clipped to each tower's number of blocks by the method (12 for ViT-B/16, 3 / 2
for the tiny CLIP), so one space serves every backbone.
"""

from search_spaces._common import training_knobs


def space(trial):
    training_knobs(trial, lr=(0.1, 20.0), weight_decay=False)
    trial.suggest_categorical("method.prompt_length", [2, 4, 8, 16])
    trial.suggest_int("method.prompt_depth", 1, 12)
    return {"training.optimizer": "sgd", "training.weight_decay": 0.0}
