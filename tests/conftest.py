"""Test environment: CPU only, 8 fake devices for sharding tests, no hub calls.

These must be set before JAX or transformers is imported anywhere.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# LLVM at -O0: the tests compile hundreds of small programs and run most of them a few
# times, so code generation is most of their XLA time. The HLO passes (fusion, layout,
# sharding) are the same at every level; only the machine code is less optimised.
# XLA_FLAGS that name a level keep it.
_flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
if "--xla_backend_optimization_level" not in _flags:
  _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = _flags.strip()
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# One XLA compilation cache for the whole session: the pytest process that starts first
# makes the folder, and the xdist workers and every subprocess a test starts inherit it, so
# a program compiled once (the tiny model's initialiser and train step, ~10 s each on 2
# cores) is read back by every later test that builds it, whichever process it runs in.
# The key covers the program, its devices, XLA flags and compiler options, so a hit is
# the executable a compile would give. A run whose config names its own
# `compile_cache_dir` (the tests of that feature) still uses its own folder.
_OWN_XLA_CACHE = "SPEECHJAX_TEST_XLA_CACHE" not in os.environ
if _OWN_XLA_CACHE:
  import tempfile

  os.environ["SPEECHJAX_TEST_XLA_CACHE"] = tempfile.mkdtemp(prefix="speechjax-test-xla-cache-")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ["SPEECHJAX_TEST_XLA_CACHE"])
# A size limit turns on the cache's file lock: two workers never read a half-written entry.
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(16 * 2**30))

import pytest  # noqa: E402


def pytest_unconfigure(config):
  del config
  if _OWN_XLA_CACHE:
    import shutil

    shutil.rmtree(os.environ["SPEECHJAX_TEST_XLA_CACHE"], ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
  """A 64/16/16-utterance synthetic corpus and a BPE tokenizer, built once per
  session: (data_dir for config.data.data_dir, tokenizer folder, corpus root)."""
  from speechjax.projects.spoken_commands import synth
  from speechjax.projects.spoken_commands.tokenizer import domain_texts, train_bpe_tokenizer

  root = tmp_path_factory.mktemp("tiny_corpus")
  synth.build(str(root), num_train=64, num_dev=16, num_test=16, seed=0, workers=1)
  tok_dir = root / "tokenizer"
  train_bpe_tokenizer(domain_texts(), vocab_size=512).save_pretrained(str(tok_dir))
  return str(root / "tfds"), str(tok_dir), str(root)


# Tests that take more than ~5 s of CPU each (~10-130 s of wall time on the shared 2-core
# machine): the demo end to end, training runs in subprocesses or several processes, trainer
# runs with checkpoints, and parity or export tests that compile large programs. They get the
# `slow` marker (registered in pytest.ini), so `make test-fast` (`pytest -m "not slow"`) stays
# within a few minutes on 2 cores; `make test` runs them all. An entry is a path relative to
# tests/: a file, or file::test (every parametrization of that test).
SLOW_TESTS = (
    "test_bench.py",
    "test_demo.py",
    "test_encoder_cache.py::test_ctc_head_trains_on_stored_states_and_the_encoder_stays_put",
    "test_evaluate.py",
    "test_gpu_bench.py",
    "test_recipes.py",
    "test_sharded_loading.py",
    "test_compile.py::test_cli_prints_a_row_and_writes_json",
    "test_compile.py::test_find_max_batch_stops_at_the_memory_boundary",
    "test_compile.py::test_one_cpu_device_report_compiles_the_step_as_the_trainer_does",
    "test_compile.py::test_reduced_slam_asr_fits_a_v5e_16_slice",
    "test_compile.py::test_reduced_slam_asr_wave_encoder_variants_fit_a_v5e_16_slice",
    "test_compile.py::test_scanned_layers_flops_are_extrapolated_from_unrolled_compiles",
    "test_compile.py::test_two_slices_put_the_data_axis_across_them",
    "test_ctranslate2.py::test_converted_folder",
    "test_ctranslate2.py::test_speechjax_encoder_matches_transformers",
    "test_ctranslate2.py::test_transformers_transcribes_speech",
    "test_decode.py::test_beam_one_is_greedy_and_sampling_at_zero_temperature_is_greedy",
    "test_decoder.py::test_scan_and_remat_give_same_logits_and_grads",
    "test_multihost.py::test_two_processes_train_what_one_process_trains",
    "test_multihost.py::test_two_process_checkpoint_resumes_in_one_process",
    "test_multihost.py::test_local_sh_fails_when_a_process_fails",
    "test_multihost.py::test_two_processes_evaluate_what_one_process_evaluates",
    "test_other_voices.py::test_long_recording_at_44k_is_chunked_and_transcribed",
    "test_plugins.py::test_toy_encoder_and_task_train_and_decode",
    "test_run_folder.py::test_moved_run_folder_evaluates_and_transcribes_from_another_cwd",
    "test_speech_llm.py::test_frame_stacked_encoder_sets_the_audio_token_count",
    "test_speech_llm.py::test_text_logits_and_the_objective_equal_the_full_logits",
    "test_sweep.py::test_sweep_runs_scores_skips_and_tabulates",
    "test_trainer.py::test_mesh_2x2x2_matches_one_device",
    "test_trainer.py::test_nan_guard_stops_with_last_good_checkpoint",
    "test_trainer.py::test_optimizer_state_holds_only_trainables",
    "test_trainer.py::test_one_cpu_device_step_compiles_with_the_memory_optimised_schedule",
    "test_trainer.py::test_resume_after_hard_kill_is_exact",
    "test_trainer.py::test_sigterm_checkpoints_and_exits_cleanly",
    "test_training_modes.py::test_mode_moves_exactly_what_it_names",
    "test_training_modes.py::test_top_n_trains_only_the_top_layers",
    "test_wave_encoders.py::test_speech_llm_trains_on_a_wave_encoder",
    "test_whisper_encoder.py::test_ctc_head_over_characters_or_tokenizer_ids_and_export",
    "test_whisper_encoder.py::test_frame_stack_low_frame_rate_masks_and_export",
    "test_eval_mesh.py::test_loaded_weights_are_sharded_over_the_requested_mesh",
    "test_eval_mesh.py::test_sharded_evaluation_gives_the_one_device_predictions",
    "test_eval_mesh.py::test_transcriber_on_an_fsdp_mesh_matches_one_device",
    "test_eval_mesh.py::test_a_mesh_that_does_not_fit_is_refused_naming_the_flag",
    "test_readme.py::test_help_blocks_parse",
    "test_classification_head.py::test_head_trains_and_evaluates_with_per_class_figures_and_a_confusion_png",
    "test_dialogue.py::test_a_speech_llm_trains_decodes_and_is_scored_on_dialogues",
    "test_recipe_table.py::test_reduced_recipe_fits_its_documented_slice",
    "test_text_classifier.py::test_a_base_bert_checkpoint_gets_a_new_head_and_keeps_its_encoder",
)


# The longest tests (60-330 s each on 2 cores, `pytest --durations`), started first, longest
# first: with two xdist workers the short tests then fill in around them, instead of one
# long test starting last and running alone at the end of the session.
LONGEST_FIRST = (
    "test_demo.py::test_quick_demo_end_to_end",
    "test_compile.py::test_reduced_slam_asr_wave_encoder_variants_fit_a_v5e_16_slice",
    "test_compile.py::test_reduced_slam_asr_fits_a_v5e_16_slice",
    "test_sweep.py::test_sweep_runs_scores_skips_and_tabulates",
    "test_recipe_table.py::test_reduced_recipe_fits_its_documented_slice",
    "test_multihost.py::test_two_processes_evaluate_what_one_process_evaluates",
)


def _matches(nodeid: str, entries) -> int | None:
  """Index of the first entry of `entries` that node id falls under, else None."""
  path = nodeid.removeprefix("tests/")
  for index, entry in enumerate(entries):
    if path == entry or path.startswith((entry + "::", entry + "[")):
      return index
  return None


def is_slow(nodeid: str) -> bool:
  """Whether a node id ("tests/test_x.py::test_y[param]") falls under an entry of SLOW_TESTS."""
  return _matches(nodeid, SLOW_TESTS) is not None


def pytest_collection_modifyitems(config, items):
  del config
  for item in items:
    if is_slow(item.nodeid):
      item.add_marker(pytest.mark.slow)
  items.sort(key=_start_rank)  # stable: the rest keep their order


def _start_rank(item) -> int:
  """Its index in LONGEST_FIRST, or after all of them."""
  rank = _matches(item.nodeid, LONGEST_FIRST)
  return len(LONGEST_FIRST) if rank is None else rank
