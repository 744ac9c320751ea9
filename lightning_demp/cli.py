"""The ``lightning-demp`` command: LightningCLI over any LightningModule/DataModule, with DemonPruning in YAML.

Run the embedded default (the residual CNN on MNIST-1D with DemP)::

    lightning-demp fit

or a config of your own::

    lightning-demp fit --config configs/mnist1d_mlp.yaml
"""

from __future__ import annotations

from importlib import resources

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI

DEFAULT_CONFIG = "mnist1d_cnn.yaml"


def default_config_path() -> str:
    """Path of the embedded default configuration (shipped inside the package).

    Examples:
        >>> from pathlib import Path
        >>> path = Path(default_config_path())
        >>> path.name, path.is_file()
        ('mnist1d_cnn.yaml', True)
    """
    return str(resources.files("lightning_demp") / "configs" / DEFAULT_CONFIG)


def main(args: list[str] | None = None) -> None:
    """Entry point of ``lightning-demp`` and ``python -m lightning_demp``.

    Args:
        args: Command-line arguments (``sys.argv[1:]`` when ``None``), e.g. ``["fit", "--config", "run.yaml"]``.

    Examples:
        Print the help (``--help`` exits, as on the command line):

        >>> import contextlib, io
        >>> output = io.StringIO()
        >>> with contextlib.redirect_stdout(output):
        ...     try:
        ...         main(["--help"])
        ...     except SystemExit as exit:
        ...         code = exit.code
        >>> code, "{fit,validate,test,predict}" in output.getvalue()
        (0, True)
    """
    LightningCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        parser_kwargs={
            subcommand: {"default_config_files": [default_config_path()]}
            for subcommand in ("fit", "validate", "test", "predict")
        },
    )
