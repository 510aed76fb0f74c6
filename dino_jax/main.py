"""Train DINO: `python -m dino_jax.main --config=configs/vits16.py --workdir=DIR [--config.KEY=VALUE ...]`.

Re-running the same command resumes from the latest checkpoint in DIR. Multi-host: on TPU VMs JAX finds the
other hosts itself; elsewhere pass --coordinator_address=HOST:PORT --num_processes=N --process_id=I.
"""
import logging as std_logging
import os
import sys

if __name__ == "__main__":  # before any thread or big allocation exists
    from dino_jax import malloc_tuning

    malloc_tuning.reexec_with_malloc_tuning()

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file("config", None, "Recipe file, e.g. configs/vits16.py (or configs/vits16.py:boosted).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, logs and evaluations go (a run resumes from here).")
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0, for multi-process runs off TPU.")
flags.DEFINE_integer("num_processes", None, "Number of processes, for multi-process runs off TPU.")
flags.DEFINE_integer("process_id", None, "This process's index, for multi-process runs off TPU.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


class _QuietLibraries(std_logging.Filter):
    """Keep the console about training: drop orbax's per-save INFO chatter (warnings and errors still show)."""

    def filter(self, record):
        return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_QuietLibraries())
    from dino_jax.data import configure_tensorflow

    configure_tensorflow()
    import jax  # after flag parsing so --help is fast

    if FLAGS.coordinator_address:
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    elif "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
        jax.distributed.initialize()  # a multi-host TPU slice: JAX discovers its peers
    logging.info("process %d of %d", jax.process_index(), jax.process_count())
    from dino_jax import config, train

    try:
        train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except (config.UserError, train.TrainingStopped) as e:  # the message says what and what to do
        sys.exit(f"FATAL {e}")


def parse_flags(argv):
    """absl's parser, but a mistyped --config.KEY override ends in one line naming it instead of a traceback."""
    from dino_jax.config import UnknownVariant

    try:
        return app.parse_flags_with_usage(argv)
    except UnknownVariant as e:  # --config=configs/NAME.py:VARIANT with no such variant
        sys.exit(f"FATAL {e}")
    except (AttributeError, KeyError) as e:  # how ml_collections reports a key the config does not have
        cause = e.args[0] if e.args else e
        detail = str(cause.args[0] if isinstance(cause, KeyError) and cause.args else cause)
        key = detail.split("\n")[0].strip("'\"")
        flag = next((a.split("=")[0] for a in argv[1:] if a.startswith("--config.") and
                     key in a.split("=")[0][len("--config."):].split(".")), None)
        if flag is None:
            raise
        hint = " ".join(detail.split("\n")[1:])
        sys.exit(f"FATAL Flags parsing error: {flag}: the config has no key {key!r}. {hint} Every key and its "
                 "default is in dino_jax/config.py (and the recipe passed as --config).".replace("  ", " "))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
