"""``python -m segformer_fast.cli`` runs the ``segformer-fast`` command, as ``python -m segformer_fast`` does."""

import sys

from segformer_fast.cli import main

sys.exit(main())
