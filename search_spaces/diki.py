"""DIKI: prompt length and depth, and the learning rate of the prompts.

DIKI trains its prompts with plain SGD at a high rate (lr 5.0, cosine, weight decay 0), so
this space fixes the optimizer to SGD and searches lr on a log scale around that value.
Depth is clipped to each tower's number of blocks by the method (12 for ViT-B/16, 3 / 2
for the tiny CLIP), so one space serves every backbone.
"""

from search_spaces._common import training_knobs


def space(trial):
    training_knobs(trial, lr=(0.1, 20.0), weight_decay=False)
    trial.suggest_categorical("method.prompt_length", [2, 4, 8, 16])
    trial.suggest_int("method.prompt_depth", 1, 12)
    return {"training.optimizer": "sgd", "training.weight_decay": 0.0}
