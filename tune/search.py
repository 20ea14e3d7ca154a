"""`python tune/search.py`: search hyperparameters and augmentation, export the winner.

A thin entry script; everything lives in raycls.search (also `raycls search`). With no
arguments it runs the `default` preset (tune/default.yaml) on the bundled digits dataset.
"""

import sys

from raycls.search import cli

if __name__ == "__main__":
    sys.exit(cli())
