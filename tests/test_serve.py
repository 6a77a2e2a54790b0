"""`speechjax serve`: requests batched by one worker, bad uploads explained, and
the page driven in headless Chromium shows the library's transcript."""

import concurrent.futures
import json
import os
import shutil
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import pytest
import soundfile as sf
from tiny_runs import free_port
from trained_run import trained_tiny_run

from speechjax.serve import BatchingQueue, UploadError, decode_upload, waveform_peaks

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def test_requests_arriving_together_share_a_batch_and_errors_reach_every_caller():
  calls = []

  def decode(waves, tasks, instructions):
    calls.append(list(tasks))
    if "fail" in tasks:
      raise RuntimeError("decoder exploded")
    return [[f"{task}:{wave.size}"] for wave, task in zip(waves, tasks)]

  batcher = BatchingQueue(decode, max_batch=3, wait_ms=300)
  futures = [batcher.submit(np.zeros(n, np.float32), task) for n, task in
             [(1, "asr"), (2, "classify"), (3, "asr"), (4, "translate")]]
  answers = [f.result(timeout=10) for f in futures]
  assert calls == [["asr", "classify", "asr"], ["translate"]]
  assert [a.segments for a in answers] == [["asr:1"], ["classify:2"], ["asr:3"], ["translate:4"]]
  assert [a.batch_size for a in answers] == [3, 3, 3, 1]
  failing = [batcher.submit(np.zeros(1, np.float32), task) for task in ("fail", "asr")]
  for future in failing:
    with pytest.raises(RuntimeError, match="decoder exploded"):
      future.result(timeout=10)
  assert batcher.submit(np.zeros(5, np.float32), "asr").result(timeout=10).segments == ["asr:5"]
  batcher.close()


def test_bad_uploads_are_explained(tmp_path):
  with pytest.raises(UploadError, match="The upload is empty"):
    decode_upload(b"", 10)
  with pytest.raises(UploadError, match="not audio the server can read"):
    decode_upload(b"hello, this is text", 10)
  sf.write(tmp_path / "long.wav", np.zeros(16000 * 3, np.float32), 16000)
  with pytest.raises(UploadError, match=r"3\.0 s long; this server takes at most 2 s") as error:
    decode_upload((tmp_path / "long.wav").read_bytes(), 2)
  assert error.value.status == 413
  peaks = waveform_peaks(np.array([0.0, 1.0, -1.0, 0.5], np.float32), columns=2)
  assert peaks == [[0.0, 1.0], [-1.0, 0.5]]


@pytest.fixture(scope="module")
def served(tiny_corpus, tmp_path_factory):
  """(server, transcriber, a test-set wav) for the tiny trained run."""
  from speechjax.serve import SpeechServer
  from speechjax.transcribe import Transcriber

  _, _, corpus_root = tiny_corpus
  with open(os.path.join(corpus_root, "test.jsonl")) as f:
    wav = os.path.join(corpus_root, json.loads(f.readline())["audio"])
  transcriber = Transcriber(trained_tiny_run(tmp_path_factory, tiny_corpus))
  server = SpeechServer(transcriber, "127.0.0.1", free_port(), run_name="tiny", max_seconds=20,
                        wait_ms=300).start()
  yield server, transcriber, wav
  server.close()


def _post(url, body, **query):
  request = urllib.request.Request(url + "api/transcribe?" + urllib.parse.urlencode(query), data=body,
                                   method="POST")
  try:
    with urllib.request.urlopen(request, timeout=120) as response:
      return response.status, json.loads(response.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())


@pytest.mark.slow  # shares a trained tiny run: ~60 s on 2 shared cores for the first test that needs it
def test_concurrent_posts_are_batched_and_answer_as_the_library_does(served):
  server, transcriber, wav = served
  [(_, expected, _)] = transcriber([wav])
  body = open(wav, "rb").read()
  with concurrent.futures.ThreadPoolExecutor(3) as pool:
    results = list(pool.map(lambda _: _post(server.url, body, task="asr"), range(3)))
  assert [status for status, _ in results] == [200, 200, 200]
  assert [r["text"] for _, r in results] == [expected] * 3
  assert max(r["batch_size"] for _, r in results) > 1  # sent together, decoded together
  status, result = _post(server.url, body, task="instruct")
  assert status == 400 and "needs an instruction" in result["error"]
  status, result = _post(server.url, body, task="dance")
  assert status == 400 and "not a registered task" in result["error"]


@pytest.mark.slow  # shares a trained tiny run: ~60 s on 2 shared cores for the first test that needs it
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install -y chromium)")
def test_page_in_headless_chromium_shows_the_transcript_and_explains_a_bad_upload(served, tmp_path):
  sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (pip install playwright)")
  server, transcriber, wav = served
  [(_, expected, _)] = transcriber([wav])
  not_audio = tmp_path / "notes.wav"
  not_audio.write_text("these are meeting notes, not a recording")
  screenshot = tmp_path / "serve.png"
  with sync_api.sync_playwright() as playwright:
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    try:
      page = browser.new_page(viewport={"width": 900, "height": 760})
      page.goto(server.url)
      page.wait_for_selector("#task option[value=asr]", state="attached")
      assert page.inner_text("#run-name").startswith("run: tiny")
      page.set_input_files("#audio-file", wav)
      page.select_option("#task", "asr")
      page.click("#run")
      page.wait_for_selector("body[data-state=done]", timeout=120_000)
      assert page.inner_text("#message") == ""
      assert page.inner_text("#answer") == (expected or "(empty answer)")
      assert page.inner_text("#timing").startswith("decoded in ")
      assert page.is_visible("#waveform")
      # The canvas holds the drawn waveform: some of its pixels are the bar colour.
      drawn = page.evaluate("""() => { const c = document.getElementById('waveform');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0; for (let i = 0; i < d.length; i += 4) if (d[i + 2] > 200 && d[i] < 100) n++; return n; }""")
      assert drawn > 500
      page.screenshot(path=str(screenshot), full_page=True)

      page.select_option("#task", "instruct")
      assert page.is_visible("#instruction")
      page.click("#run")
      page.wait_for_function("document.getElementById('message').textContent.length > 0")
      assert "needs an instruction" in page.inner_text("#message")

      page.select_option("#task", "asr")
      page.set_input_files("#audio-file", str(not_audio))
      page.evaluate("document.body.dataset.state = ''")
      page.click("#run")
      page.wait_for_selector("body[data-state=done]", timeout=60_000)
      assert "not audio the server can read" in page.inner_text("#message")
      assert page.inner_text("#answer") == ""
    finally:
      browser.close()
  assert screenshot.stat().st_size > 10_000
  if os.path.isdir("/work/notes"):  # a copy for people to look at
    shutil.copyfile(screenshot, "/work/notes/serve.png")
