"""Plumbing shared by the command-line entry points: a quiet environment, readable logging, `--version`,
`--verbose` and one-line errors; and the console scripts (`imgclf-train`, `imgclf-evaluate`, ...).

Exit codes: 0 success; 1 predict could read none of its images; 2 an error in the input (data, flags, config,
work directory) or a failed write, explained in one line; 130 interrupted (Ctrl-C)."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import platform
import sys
import traceback
import types
import warnings
from typing import Callable, Optional, Sequence

from absl import app
from absl import logging as absl_logging

from imgclf_jax import __version__, user_cache, xla_cpu
from imgclf_jax.errors import EXIT_USER_ERROR, UserError

EXIT_INTERRUPTED = 130
VERBOSE_FLAG = "--verbose"
COMMANDS = ("train", "evaluate", "predict", "doctor", "report", "export")
COMPILATION_CACHE_ENV = "IMGCLF_COMPILATION_CACHE"
COMPILATION_CACHE_MAX_BYTES = 2**30  # Least recently used entries go beyond this.


def prepare_environment(argv: Sequence[str] = (), tensorflow: bool = True) -> None:
    """Called by each entry point before anything imports TensorFlow: without `--verbose` in `argv`,
    TensorFlow's C++ start-up INFO lines (CPU features) are not printed (a value the user set is kept).
    TensorFlow's oneDNN operations are left off unless the user turns them on (`TF_ENABLE_ONEDNN_OPTS=1`):
    on CPUs where they are on by default (AVX-512 ones) TensorFlow announces them on stderr before it reads
    its log level, and only tf.data runs on TensorFlow here, whose decoding and resizing do not use them
    (the same images/s either way, docs/performance.md). With `tensorflow`, it is then imported without the
    Keras it would load (`_import_tensorflow`) and kept off the GPUs, which JAX owns (tf.data only needs the
    CPU)."""
    if VERBOSE_FLAG not in argv:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    if tensorflow:
        _import_tensorflow().config.set_visible_devices([], "GPU")


def _import_tensorflow() -> types.ModuleType:
    """`import tensorflow`, without the Keras it imports eagerly at the end ("keras.src.optimizers", for
    SavedModel registrations we never use): that is all of Keras, plus scikit-learn for Keras's wrappers
    where it is installed, about 2 s of every command's start-up. A placeholder stands in for that one module
    while TensorFlow loads and is removed afterwards, so a later `import keras` (or `tf.keras`) loads as usual.
    """
    name = "keras.src.optimizers"
    if "tensorflow" in sys.modules or "keras" in sys.modules or name in sys.modules:
        import tensorflow
        return tensorflow
    placeholder = sys.modules[name] = types.ModuleType(name)
    try:
        import tensorflow
    finally:
        if sys.modules.get(name) is placeholder:
            del sys.modules[name]
    return tensorflow


def _command(name: str) -> Callable[[], None]:
    def run_command() -> None:
        prepare_environment(sys.argv, tensorflow=name != "doctor")
        importlib.import_module(f"imgclf_jax.{name}").run()

    run_command.__name__ = name
    return run_command


# The console scripts of pyproject.toml: imgclf-train, imgclf-evaluate, imgclf-predict, imgclf-doctor, imgclf-report,
# imgclf-export.
train, evaluate, predict, doctor, report, export = (_command(name) for name in COMMANDS)


def version() -> str:
    """The installed package's version."""
    return __version__


def setup_logging(verbose: bool = False) -> None:
    """Our messages at INFO as 'HH:MM:SS message'; libraries (orbax, absl) only from WARNING up, and their
    Python warnings, which a user cannot act on, only with `verbose`."""
    if not verbose:
        warnings.filterwarnings("ignore")
        warnings.filterwarnings("default", module="imgclf_jax")
    handler = absl_logging.get_absl_handler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    # orbax reports routine events (e.g. opening checkpoints read-only) as warnings, and a failed save as
    # tracebacks from each of its threads, through absl; what matters reaches the user as our own one line.
    if not verbose:  # TFDS likewise warns of the folders it looks for before preparing a dataset.
        handler.addFilter(lambda record: not any(f"{os.sep}{library}{os.sep}" in record.pathname
                                                 for library in ("orbax", "tensorflow_datasets")))
    absl_logging.set_verbosity(absl_logging.INFO)
    logging.getLogger("absl").setLevel(logging.WARNING)
    for noisy in ("jax", "orbax", "tensorflow", "etils"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    sys.unraisablehook = _quiet_unraisable_hook(sys.unraisablehook)


def _quiet_unraisable_hook(default: Callable) -> Callable:
    """Drops what orbax's reads still in flight report once a restore has failed and closed their event loop
    (dozens of 'Event loop is closed' tracebacks after the one warning that matters); anything else goes to
    `default`."""

    def hook(unraisable) -> None:
        value, frames = unraisable.exc_value, traceback.extract_tb(unraisable.exc_traceback)
        if (isinstance(value, RuntimeError) and str(value) == "Event loop is closed") or any(
                f"{os.sep}orbax{os.sep}" in frame.filename for frame in frames):
            logging.getLogger(__name__).debug("dropped after a failed restore: %s", str(value)[:200])
            return
        default(unraisable)

    return hook


def run(prog: str, main: Callable[[Sequence[str]], None], argv_fn: Callable[[], list[str]] = lambda: sys.argv) -> None:
    """Runs `main` under absl (flag parsing) so that a UserError becomes `prog: error: ...`, exit 2.

    First of all, before anything starts JAX's CPU backend, freed host memory is set to be reused (xla_cpu),
    and compiled functions are kept on disk for the next run (`use_compilation_cache`).
    """
    xla_cpu.keep_freed_memory()
    use_compilation_cache()
    if "--version" in sys.argv[1:]:
        print(f"{prog} (imgclf_jax) {version()}")
        sys.exit(0)
    verbose = VERBOSE_FLAG in sys.argv[1:]
    if verbose:
        sys.argv.remove(VERBOSE_FLAG)

    def guarded_main(argv: Sequence[str]) -> None:
        setup_logging(verbose)
        try:
            main(argv)
        except UserError as e:
            _fail(prog, str(e))
        except OSError as e:  # The machine's, not the code's: permissions, a full disk, a vanished folder.
            where = f": {e.filename}" if e.filename else ""
            _fail(prog, f"{e.strerror or e}{where}")
        except KeyboardInterrupt:
            print(f"{prog}: interrupted", file=sys.stderr, flush=True)
            _exit(EXIT_INTERRUPTED)

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


def use_compilation_cache() -> Optional[str]:
    """Turns on JAX's persistent compilation cache; returns its directory (None: left off).

    XLA compiles each jitted function anew in every process: on a CPU, seconds each for the parameter
    initialisation and the train step of every run. With the cache, a later run of the same model and
    settings loads those (JAX keeps what took a second or more to compile) from disk instead. The directory
    is xla-<machine> in `user_cache.cache_dir()`, one per CPU model and instruction set, so a home folder
    shared by different machines never hands one machine another's code. IMGCLF_COMPILATION_CACHE=0 leaves
    the cache off; JAX's own JAX_COMPILATION_CACHE_DIR, if set, is used as it is.
    """
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    if os.environ.get(COMPILATION_CACHE_ENV) == "0":
        return None
    path = os.path.join(user_cache.cache_dir(), f"xla-{_machine_id()}")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:  # A read-only home, say: run without the cache.
        logging.getLogger(__name__).debug("no compilation cache at %s: %s", path, e)
        return None
    settings = {"jax_compilation_cache_dir": path}
    # JAX's default lets the cache grow without end; bounding it takes the filelock package.
    if "JAX_COMPILATION_CACHE_MAX_SIZE" not in os.environ and importlib.util.find_spec("filelock"):
        settings["jax_compilation_cache_max_size"] = COMPILATION_CACHE_MAX_BYTES
    jax = sys.modules.get("jax")
    for name, value in settings.items():
        if jax is not None:
            jax.config.update(name, value)
        else:  # JAX reads these when imported; entry points that never need it (doctor) stay without it.
            os.environ[name.upper()] = str(value)
    return path


def _machine_id() -> str:
    """A short name for this kind of machine: architecture plus a hash of the CPU model and its features."""
    details = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            details += "".join(sorted({line for line in f if line.startswith(("model name", "flags"))}))
    except OSError:
        pass
    return f"{platform.machine()}-{hashlib.sha256(details.encode()).hexdigest()[:12]}"


def _fail(prog: str, message: str) -> None:
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    _exit(EXIT_USER_ERROR)


def _exit(code: int) -> None:
    """Ends the process with `code` after an error, at once: the work is saved or refused by then, and
    libraries' teardown can hang after a failure (orbax's threads wait forever for a write that failed; a
    tf.data pipeline whose read failed can deadlock the interpreter's last garbage collection)."""
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)
