"""``python -m segformer_fast`` runs the ``segformer-fast`` command (and ``torchrun ... -m segformer_fast ...``)."""

import sys

from segformer_fast.cli import main

sys.exit(main())
