"""`python -m speechjax.serve --workdir=W [--host=127.0.0.1 --port=8000]` (see __init__.py)."""

import logging
import os

from absl import app, flags

from speechjax import transcribe
from speechjax.transcriber import Transcriber

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string("workdir", None, "Training folder (config.json + checkpoints).")
  flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (0.0.0.0 opens it to the network).")
  flags.DEFINE_integer("port", 8000, "Port to listen on.")
  flags.DEFINE_string("checkpoint", "best", "best | last")
  flags.DEFINE_float("max_seconds", 120.0, "Longest audio accepted, in seconds.")
  flags.DEFINE_float("max_upload_mb", 50.0, "Largest upload accepted, in MB.")
  flags.DEFINE_float("batch_wait_ms", 10.0, "How long a request waits for others to share its batch.")
  transcribe.define_decode_flags()  # --decode.method=beam --decode.beam_size=5 ...
  flags.adopt_module_key_flags(transcribe)  # --help lists them
  flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    decode = transcribe.check_decode_overrides(transcribe.decode_flag_values())
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  from speechjax.serve.server import SpeechServer

  logging.getLogger("speechjax.serve.server").setLevel(logging.INFO)
  transcribe.use_run_compile_cache(FLAGS.workdir)
  transcriber = Transcriber(FLAGS.workdir, FLAGS.checkpoint, decode=decode)
  server = SpeechServer(transcriber, FLAGS.host, FLAGS.port,
                        run_name=os.path.basename(os.path.normpath(FLAGS.workdir)),
                        max_seconds=FLAGS.max_seconds, max_upload_mb=FLAGS.max_upload_mb,
                        wait_ms=FLAGS.batch_wait_ms)
  print(f"serving {FLAGS.workdir} at {server.url} (Ctrl-C stops)", flush=True)
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    server.close()


if __name__ == "__main__":
  define_flags()
  app.run(main)
