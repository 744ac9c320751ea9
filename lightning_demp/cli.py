"""The ``lightning-demp`` command: LightningCLI over any LightningModule/DataModule, with DemonPruning in YAML.

Run the embedded default (the residual CNN on MNIST-1D with DemP)::

    lightning-demp fit

or a config, or classes, of your own::

    lightning-demp fit --config configs/mnist1d_mlp.yaml
    lightning-demp fit --model my_package.MyModel --data my_package.MyData

The embedded default applies only when the command names no ``--config``, ``--model`` or ``--data``: a user's own
classes keep their own defaults. Bad callback arguments and misspelled options end in one short error that names
the argument (with the closest accepted name), not in tracebacks.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
import sys
from collections.abc import Sequence
from importlib import resources
from typing import Any, NoReturn

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_demp import __version__
from lightning_demp.callback import DemonPruning

DEFAULT_CONFIG = "mnist1d_cnn.yaml"
SUBCOMMANDS = ("fit", "validate", "test", "predict")
DESCRIPTION = (
    "lightning-demp: train any LightningModule with Demon's Pruning (DemP), which makes units die and removes them "
    "while the network trains. Without --config, --model or --data, `fit` runs the embedded default (a residual "
    "CNN on MNIST-1D); `lightning-demp fit --help` lists every option, DemonPruning's under --trainer.callbacks."
)
# The options that say "my own run": with any of them, the embedded default config stays out of the way.
_OWN_RUN_OPTIONS = ("--config", "-c", "--model", "--data")
_NOT_ACCEPTED = re.compile(
    r"Problem with given class_path '(?P<path>[\w.]+)':\s*Option '(?P<option>\w+)' is not accepted"
)


def default_config_path() -> str:
    """Path of the embedded default configuration (shipped inside the package).

    Examples:
        >>> from pathlib import Path
        >>> path = Path(default_config_path())
        >>> path.name, path.is_file()
        ('mnist1d_cnn.yaml', True)
    """
    return str(resources.files("lightning_demp") / "configs" / DEFAULT_CONFIG)


def uses_embedded_default(args: Sequence[str]) -> bool:
    """Whether a command line runs on the embedded default config: it names no config, model or data of its own.

    Examples:
        >>> uses_embedded_default(["fit", "--trainer.max_epochs=3"])
        True
        >>> uses_embedded_default(["fit", "--model", "my.Net", "--data=my.Data"])
        False
        >>> uses_embedded_default(["fit", "-c", "run.yaml"])
        False
    """
    return not any(arg.split("=", 1)[0].split(".", 1)[0] in _OWN_RUN_OPTIONS for arg in args)


def close_argument_names(class_path: str, option: str) -> list[str]:
    """Accepted ``__init__`` arguments of ``class_path`` that look like the misspelled ``option``.

    Examples:
        >>> close_argument_names("lightning_demp.DemonPruning", "reg_maxx")
        ['reg_max']
    """
    module_name, _, class_name = class_path.rpartition(".")
    try:
        klass = getattr(importlib.import_module(module_name), class_name)
        names = list(inspect.signature(klass).parameters)
    except (ImportError, AttributeError, ValueError, TypeError):
        return []
    return difflib.get_close_matches(option, names, n=3)


def short_error(message: str) -> str:
    """``message`` from jsonargparse, shortened to what the user must change (with a suggestion when one fits).

    Examples:
        >>> print(short_error("Problem with given class_path 'lightning_demp.DemonPruning':\\n"
        ...                   "    Option 'reg_maxx' is not accepted"))
        `lightning_demp.DemonPruning` has no argument `reg_maxx`. Did you mean `reg_max`?
    """
    found = _NOT_ACCEPTED.search(message)
    if found is None:
        return message
    path, option = found["path"], found["option"]
    close = close_argument_names(path, option)
    hint = f" Did you mean {' or '.join(f'`{name}`' for name in close)}?" if close else ""
    return f"`{path}` has no argument `{option}`.{hint}"


class DemonPruningArgumentParser(LightningArgumentParser):
    """LightningCLI's parser, ending a bad command line in one short message instead of a page of usage.

    Examples:
        >>> import contextlib, io
        >>> parser = DemonPruningArgumentParser(prog="demo")
        >>> _ = parser.add_argument("--epochs", type=int)
        >>> with contextlib.redirect_stderr(io.StringIO()) as err:
        ...     try:
        ...         parser.parse_args(["--epochs", "many"])
        ...     except SystemExit as exit:
        ...         code = exit.code
        >>> code, err.getvalue().startswith("error: "), err.getvalue().splitlines()[-1]
        (2, True, '(`demo --help` lists the accepted options.)')
    """

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        """Print ``message`` (shortened by `short_error`) and where the options are listed, then exit with code 2."""
        if not self.exit_on_error:
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(f"error: {short_error(message)}\n(`{prog} --help` lists the accepted options.)\n")
        self.exit(2)


class DemonPruningCLI(LightningCLI):
    """LightningCLI that checks DemonPruning's arguments before anything is built and reports them in one line.

    Examples:
        >>> import contextlib, io
        >>> args = ["fit", "--trainer.callbacks=lightning_demp.DemonPruning", "--trainer.callbacks.reg_max=-1",
        ...         "--model=lightning_demp.demos.MLPClassifier", "--data=lightning_demp.demos.DigitsDataModule"]
        >>> with contextlib.redirect_stderr(io.StringIO()) as err:
        ...     try:
        ...         DemonPruningCLI(pl.LightningModule, pl.LightningDataModule, args=args,
        ...                         subclass_mode_model=True, subclass_mode_data=True)
        ...     except SystemExit as exit:
        ...         code = exit.code
        >>> code, err.getvalue().splitlines()[0]
        (2, 'error: DemonPruning: Expected `reg_max` to be a number in [0.0, inf), got -1.0.')
    """

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        """The parser, of `DemonPruningArgumentParser`'s kind."""
        self.parser_class = DemonPruningArgumentParser
        return super().init_parser(**kwargs)

    def before_instantiate_classes(self) -> None:
        """Build each configured `DemonPruning` once on its own, so that a bad value ends in a one-line error."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        for spec in _as_list(config.get("trainer", {}).get("callbacks")):
            class_path = str(getattr(spec, "class_path", ""))
            module_name, _, class_name = class_path.rpartition(".")
            klass = getattr(importlib.import_module(module_name), class_name, None) if module_name else None
            if not (isinstance(klass, type) and issubclass(klass, DemonPruning)):
                continue
            init_args = dict(vars(spec.init_args)) if getattr(spec, "init_args", None) is not None else {}
            try:
                klass(**init_args)
            except (TypeError, ValueError) as error:
                parser = self._subcommand_parsers.get(self.subcommand) if self.subcommand else None
                (parser or self.parser).error(f"{class_name}: {error}")


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


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
        >>> code, "{fit,validate,test,predict}" in output.getvalue(), "Demon's Pruning" in output.getvalue()
        (0, True, True)
    """
    command_line = sys.argv[1:] if args is None else args
    defaults = [default_config_path()] if uses_embedded_default(command_line) else []
    DemonPruningCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        parser_kwargs={
            "prog": "lightning-demp",
            "description": DESCRIPTION,
            "version": __version__,
            **{subcommand: {"default_config_files": defaults} for subcommand in SUBCOMMANDS},
        },
    )
