"""DAGR: the graph's alpha, beta, gamma, K, top-k, tau, the three lambdas and their depth
decay, plus DIKI's knobs (SGD lr, prompt length and depth).

Like DIKI's space it fixes SGD without weight decay and searches lr on a log scale around
5.0; momentum and clipping come from the study's ``training`` block (DIKI's protocol:
``momentum: 0.0``, ``grad_clip: null``, as ``studies/mtil_dagr.yaml``). Depth is clipped
to each tower's blocks by the method.
"""

from search_spaces._common import training_knobs


def space(trial):
    training_knobs(trial, lr=(0.1, 20.0), weight_decay=False)
    trial.suggest_categorical("method.prompt_length", [2, 4, 8, 16])
    trial.suggest_int("method.prompt_depth", 1, 12)
    trial.suggest_float("method.alpha", 0.0, 1.0)
    trial.suggest_float("method.beta", 0.25, 4.0, log=True)
    trial.suggest_float("method.gamma", 0.0, 1.0)
    trial.suggest_categorical("method.num_nodes", [8, 16, 32])
    trial.suggest_categorical("method.topk", [4, 8, 16])
    trial.suggest_float("method.tau", -0.2, 0.8)
    for name in ("lambda_edge", "lambda_multi", "lambda_path"):
        trial.suggest_float(f"method.{name}", 0.01, 10.0, log=True)
    trial.suggest_float("method.lambda_decay", 0.5, 1.0)
    return {"training.optimizer": "sgd", "training.weight_decay": 0.0}
