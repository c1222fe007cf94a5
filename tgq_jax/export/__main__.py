"""``python -m tgq_jax.export``: the export command line (:func:`tgq_jax.export.cli.main`)."""
import sys

from tgq_jax.export.cli import main

sys.exit(main())
