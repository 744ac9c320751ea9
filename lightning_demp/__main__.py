"""``python -m lightning_demp`` runs the ``lightning-demp`` command."""

from lightning_demp.cli import main

if __name__ == "__main__":
    main()
