"""``python -m tgq_jax.export``: the export command line (:func:`tgq_jax.export.main`)."""
import sys

from tgq_jax.export import main

sys.exit(main())
