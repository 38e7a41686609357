"""``python -m graphopt.tune JOB.json RESULT.json``: run one trial (see :mod:`graphopt.tune.worker`)."""

import sys

from graphopt.tune.worker import main

sys.exit(main(sys.argv[1:]))
