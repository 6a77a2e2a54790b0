"""Generation with a KV cache: greedy, beam search and sampling, as one compiled program.

    search.py       generate / generate_from_prompt for any (step_fn, init_cache_fn) model,
                    prompt bucketing and alignment, prefill, decoded ids -> texts
    token_loops.py  the sampling and beam-search loops inside the compiled program
    model_steps.py  generate_lm (decoder LMs) and generate_speech (the SpeechLLM)
    long_audio.py   chunk_audio / join_transcripts for audio longer than the encoder window

    from speechjax.generation import generate_speech, decode_texts

The submodules import only JAX and NumPy at module level; the models are
imported inside the functions that build their step functions.
"""

from speechjax.generation.long_audio import chunk_audio, join_transcripts
from speechjax.generation.model_steps import (
  SPEECH_BATCH_KEYS,
  check_position_range,
  generate_lm,
  generate_speech,
  lm_decode_fns,
  speech_decode_fns,
)
from speechjax.generation.search import (
  METHODS,
  InitCacheFn,
  StepFn,
  decode_texts,
  decoding_settings,
  generate,
  generate_from_prompt,
  left_align,
  output_token_lists,
  pad_to_bucket,
)
from speechjax.generation.token_loops import GenerationOutput

__all__ = [
    "METHODS", "SPEECH_BATCH_KEYS", "GenerationOutput",
    "InitCacheFn", "StepFn", "check_position_range", "chunk_audio", "decode_texts",
    "decoding_settings", "generate", "generate_from_prompt", "generate_lm", "generate_speech",
    "join_transcripts", "left_align", "lm_decode_fns", "output_token_lists", "pad_to_bucket",
    "speech_decode_fns",
]
