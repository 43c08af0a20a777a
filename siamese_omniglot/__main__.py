"""``python -m siamese_omniglot`` runs the ``siamese`` command line."""

from .cli import main

main()
