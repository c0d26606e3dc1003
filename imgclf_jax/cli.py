"""Plumbing shared by the command-line entry points: readable logging and one-line errors."""

from __future__ import annotations

import logging
import sys
from typing import Callable, Sequence

from absl import app
from absl import logging as absl_logging

from imgclf_jax import xla_cpu
from imgclf_jax.errors import EXIT_USER_ERROR, UserError

EXIT_INTERRUPTED = 130


def setup_logging() -> None:
    """Our messages at INFO as 'HH:MM:SS message'; libraries (orbax, absl) only from WARNING up."""
    handler = absl_logging.get_absl_handler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    # orbax reports routine events (e.g. opening checkpoints read-only) as warnings through absl.
    handler.addFilter(lambda record: record.levelno >= logging.ERROR or "orbax" not in record.pathname)
    absl_logging.set_verbosity(absl_logging.INFO)
    logging.getLogger("absl").setLevel(logging.WARNING)
    for noisy in ("jax", "orbax", "tensorflow", "etils"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run(prog: str, main: Callable[[Sequence[str]], None], argv_fn: Callable[[], list[str]] = lambda: sys.argv) -> None:
    """Runs `main` under absl (flag parsing) so that a UserError becomes `prog: error: ...`, exit 2.

    First of all, before anything starts JAX's CPU backend, freed host memory is set to be reused (xla_cpu).
    """
    xla_cpu.keep_freed_memory()

    def guarded_main(argv: Sequence[str]) -> None:
        setup_logging()
        try:
            main(argv)
        except UserError as e:
            _fail(prog, str(e))
        except KeyboardInterrupt:
            print(f"{prog}: interrupted", file=sys.stderr, flush=True)
            sys.exit(EXIT_INTERRUPTED)

    def parse_flags(argv: list[str]) -> list[str]:
        try:
            return app.parse_flags_with_usage(argv)
        except (AttributeError, KeyError) as e:  # ml_collections: an override of a field that does not exist.
            _fail(prog, f"unknown config field {str(e).strip(chr(34))} in a --config.FIELD=VALUE override")
        except (TypeError, ValueError) as e:  # ml_collections: a value of the wrong type for its field.
            _fail(prog, f"bad --config override: {e}")

    try:
        argv = argv_fn()
    except UserError as e:
        _fail(prog, str(e))
    app.run(guarded_main, argv=argv, flags_parser=parse_flags)


def _fail(prog: str, message: str) -> None:
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)
