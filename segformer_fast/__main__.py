"""``python -m segformer_fast`` runs the ``segformer-fast`` command (and ``torchrun ... -m segformer_fast ...``)."""

import sys

from .cli import main

sys.exit(main())
