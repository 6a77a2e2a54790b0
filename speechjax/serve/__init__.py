r"""`speechjax serve`: a local web page for a trained run.

    speechjax serve --workdir=runs/demo [--host=127.0.0.1 --port=8000]

A user uploads or records audio, picks a task (transcribe, translate,
classify, or a free instruction typed in a box) and sees the answer, the
decoding time and, for a transcription, the waveform. The run loads once;
requests arriving within a few milliseconds of each other are decoded as one
batch (batching.py). The page is one static HTML file served by the standard
library (server.py): no web framework to install.
"""

from speechjax.serve.batching import Answer, BatchingQueue
from speechjax.serve.server import SpeechServer, UploadError, decode_upload, waveform_peaks

__all__ = ["Answer", "BatchingQueue", "SpeechServer", "UploadError", "decode_upload", "waveform_peaks"]
