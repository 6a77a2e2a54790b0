"""The HTTP side of `speechjax serve`: one page, two JSON endpoints.

    GET  /                 the page (static/index.html)
    GET  /api/info         {"run", "tasks": [{"name", "label", "trained", "needs_instruction"}], "max_seconds"}
    POST /api/transcribe?task=asr[&instruction=...]   body: the audio file's bytes
         200 {"text", "task", "segments", "decode_seconds", "batch_size", "audio_seconds", "waveform"}
         400 / 413 {"error": message for the page}

The standard library's ThreadingHTTPServer gives each request a thread; the
threads meet in a BatchingQueue, whose one worker owns the model.
"""

from __future__ import annotations

from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
import json
import logging
import os
import threading
from urllib.parse import parse_qs, urlparse

import numpy as np

from speechjax.serve.batching import BatchingQueue

log = logging.getLogger(__name__)

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
TASK_LABELS = {"asr": "Transcribe", "translate": "Translate", "classify": "Classify",
               "instruct": "Free instruction"}
WAVEFORM_COLUMNS = 800


class UploadError(ValueError):
  """A request the page should explain: bad audio, a missing instruction, ..."""

  def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST):
    super().__init__(message)
    self.status = status


def waveform_peaks(wave: np.ndarray, columns: int = WAVEFORM_COLUMNS) -> list[list[float]]:
  """[min, max] of each of `columns` equal slices: enough to draw the waveform."""
  wave = np.asarray(wave, np.float32)
  columns = max(1, min(columns, wave.size))
  edges = np.linspace(0, wave.size, columns + 1).astype(int)
  return [[round(float(wave[a:b].min()), 4), round(float(wave[a:b].max()), 4)]
          for a, b in zip(edges[:-1], edges[1:])]


def decode_upload(body: bytes, max_seconds: float) -> np.ndarray:
  """The uploaded file as 16 kHz mono samples; UploadError saying what is wrong."""
  from speechjax.data import audio as audio_lib

  if not body:
    raise UploadError("The upload is empty: choose an audio file or record something first.")
  try:
    wave = audio_lib.load_audio(body)
  except Exception as e:  # libsndfile's reasons vary by format; the page shows its words
    raise UploadError(f"This file is not audio the server can read (wav, flac, ogg, mp3): {e}") from None
  if wave.size == 0:
    raise UploadError("The audio holds no samples.")
  if not np.all(np.isfinite(wave)):
    raise UploadError("The audio holds NaN or infinite samples.")
  seconds = wave.size / audio_lib.SAMPLE_RATE
  if seconds > max_seconds:
    raise UploadError(f"The audio is {seconds:.1f} s long; this server takes at most {max_seconds:g} s.",
                      HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
  return wave


class SpeechServer:
  """A loaded run behind a web page. `start()` serves from a thread (tests);
  `serve_forever()` blocks (the command); `close()` stops both."""

  def __init__(self, transcriber, host: str = "127.0.0.1", port: int = 8000, *, run_name: str = "",
               max_seconds: float = 120.0, max_upload_mb: float = 50.0, wait_ms: float = 10.0):
    from speechjax.data import tasks as tasks_lib

    self.transcriber = transcriber
    self.max_seconds, self.max_bytes = float(max_seconds), int(max_upload_mb * 1024 * 1024)
    self.batcher = BatchingQueue(transcriber.decode_waves, max_batch=transcriber.batch_size, wait_ms=wait_ms)
    trained = set(transcriber.config.data.tasks)
    self.info = {
        "run": run_name,
        "max_seconds": self.max_seconds,
        "tasks": [{"name": name, "label": TASK_LABELS.get(name, name), "trained": name in trained,
                   "needs_instruction": bool(tasks_lib.get_task(name).instruction_field)}
                  for name in sorted(tasks_lib.task_names(), key=lambda n: (n not in trained, n))
                  if not tasks_lib.get_task(name).multi_audio],  # one upload is one clip
    }
    self.httpd = ThreadingHTTPServer((host, port), self._handler_class())
    self.httpd.daemon_threads = True
    self._thread: threading.Thread | None = None

  @property
  def url(self) -> str:
    host, port = self.httpd.server_address[:2]
    return f"http://{host}:{port}/"

  def start(self) -> SpeechServer:
    self._thread = threading.Thread(target=self.httpd.serve_forever, name="speechjax-serve", daemon=True)
    self._thread.start()
    return self

  def serve_forever(self) -> None:
    self.httpd.serve_forever()

  def close(self) -> None:
    self.httpd.shutdown()
    self.httpd.server_close()
    self.batcher.close()

  def answer(self, body: bytes, task: str, instruction: str) -> dict:
    """The JSON for one upload (UploadError for what the page should explain)."""
    from speechjax import generation
    from speechjax.data import audio as audio_lib
    from speechjax.transcriber import check_task

    try:
      check_task(task, instruction)
    except ValueError as e:
      raise UploadError(str(e)) from None
    wave = decode_upload(body, self.max_seconds)
    result = self.batcher.submit(wave, task, instruction).result()
    return {
        "text": generation.join_transcripts([s.text for s in result.segments]),
        "task": task,
        "segments": [{"start": round(s.start, 3), "end": round(s.end, 3), "text": s.text}
                     for s in result.segments],
        "decode_seconds": round(result.decode_seconds, 4),
        "batch_size": result.batch_size,
        "audio_seconds": round(wave.size / audio_lib.SAMPLE_RATE, 3),
        "waveform": waveform_peaks(wave),
    }

  def _handler_class(self):
    server = self

    class Handler(BaseHTTPRequestHandler):
      protocol_version = "HTTP/1.1"

      def log_message(self, format, *args):  # noqa: A002  (the base class' name)
        log.info("%s %s", self.address_string(), format % args)

      def _send(self, status, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

      def _json(self, status, obj) -> None:
        self._send(status, json.dumps(obj, ensure_ascii=False).encode("utf-8"), "application/json")

      def do_GET(self):  # noqa: N802  (http.server's naming)
        path = urlparse(self.path).path
        if path in ("/", "/index.html"):
          with open(os.path.join(STATIC_DIR, "index.html"), "rb") as f:
            self._send(HTTPStatus.OK, f.read(), "text/html; charset=utf-8")
        elif path == "/api/info":
          self._json(HTTPStatus.OK, server.info)
        else:
          self._json(HTTPStatus.NOT_FOUND, {"error": f"no page at {path}"})

      def do_POST(self):  # noqa: N802
        url = urlparse(self.path)
        if url.path != "/api/transcribe":
          self._json(HTTPStatus.NOT_FOUND, {"error": f"no endpoint at {url.path}"})
          return
        query = parse_qs(url.query)
        task = query.get("task", ["asr"])[0]
        instruction = query.get("instruction", [""])[0]
        length = int(self.headers.get("Content-Length") or 0)
        if length > server.max_bytes:
          self.close_connection = True  # the unread body must not be taken for the next request
          self._json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                     {"error": f"The file is {length / 2**20:.1f} MB; this server takes at most "
                               f"{server.max_bytes / 2**20:g} MB."})
          return
        body = self.rfile.read(length) if length else b""
        try:
          self._json(HTTPStatus.OK, server.answer(body, task, instruction))
        except UploadError as e:
          self._json(e.status, {"error": str(e)})
        except Exception as e:  # the page shows a message; the log keeps the trace
          log.exception("decoding failed")
          self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"Decoding failed: {type(e).__name__}: {e}"})

    return Handler
