"""`raycls search` / `python tune/search.py`: Ray Tune over TrainConfig, one TorchTrainer a trial.

The package reads in the order a search runs:
- raycls.search.settings: SearchSettings, the YAML presets in `tune/`, the flags over them;
- raycls.search.space: the Tune space, a trial's fixed config, the checks before any trial runs;
- raycls.search.trainable: `train_driver`, the Tune trial that fits one TorchTrainer;
- raycls.search.schedulers: ASHA, PBT with PBA's policy explore, FIFO; the searchers;
- raycls.search.run: the search directory, `Tuner.fit` / `Tuner.restore`, Ctrl-C;
- raycls.search.reports: the ranked table, results.csv, the plot, the best trial, its export;
- raycls.search.command: the flags and exit codes of the command.
What it prints is raycls.search_console; its Ray callbacks are raycls.tune_callbacks.

No module of the package imports Ray at module level: `raycls search` imports it to parse its
flags, and a new local Ray must get its settings (RAY_AUTH_MODE: raycls.ray_session.init_ray)
before the first Ray import. raycls.search_console and raycls.tune_callbacks subclass Ray's
callbacks, so they are imported only once Ray is started.
"""

from raycls.search.command import add_arguments, cli, main

# A PBT search saved before this package was split pickled its explore step as
# raycls.search.PolicyExplorer; `--resume` of such a search loads it from here.
from raycls.search.schedulers import PolicyExplorer

__all__ = ["PolicyExplorer", "add_arguments", "cli", "main"]
