"""Compile targets: a TPU slice named as Cloud TPU names it, NVIDIA GPUs, or the local devices.

    target = resolve_target("v5e-16")            # 16 abstract v5e chips, no TPU needed
    target = resolve_target("v5p-128", num_slices=2)
    target = resolve_target("h100-8")            # one host of 8 H100s, no GPU needed
    target = resolve_target("")                  # jax.devices() of this process

A TPU slice is described by libtpu (`pip install libtpu`, or the package's
`speechjax[tpu-compile]` extra): `jax.experimental.topologies` turns a
topology into compile-only devices, so XLA's TPU compiler runs on a CPU
machine and reports the memory and FLOPs of each chip. Those devices sit on a
backend of their own, beside the process' CPU (or GPU) devices.

Accelerator-type names count TensorCores on v4 and v5p (two per chip: v4-32 is
16 chips, a 2x2x4 torus) and chips on v5e and v6e (v5e-16 is a 4x4 grid); the
cores of a v4/v5p chip compile as one device ("megacore"), so one device is
one chip on every generation. Chip figures are Cloud TPU's published ones.

GPUs ('a100-8', 'h100-16': the part and the number of GPUs, hosts of 8)
compile the same way through JAX's CUDA plugin (`pip install 'jax[cuda13]'`),
which builds compile-only devices from a `GpuTargetConfig` (`gpu_target_config`,
the part's published figures) when no GPU is present.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re

INSTALL_HINT = ("compiling for a TPU topology needs libtpu on this machine: `pip install libtpu` "
                "(or `pip install speechjax[tpu-compile]`); without it, leave --topology empty to "
                "compile for the local devices")


@dataclasses.dataclass(frozen=True)
class ChipSpec:
  name: str  # as in accelerator types: v5e
  device_kind: str  # as jax reports it: "TPU v5 lite"
  hbm_gib: float
  peak_bf16_tflops: float  # dense, per chip
  cores_per_chip: int  # TensorCores
  name_counts: str  # what the number in "v5p-128" counts: "cores" | "chips"
  chip_config: str  # libtpu chip config: "megacore" = one device per two-core chip
  shapes: dict  # chips -> torus/grid shape of the slice


GRID_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16),
           256: (16, 16)}
TORUS_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8),
            256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16), 2048: (8, 16, 16), 4096: (16, 16, 16),
            6144: (16, 16, 24)}

CHIPS = {
    "v4": ChipSpec("v4", "TPU v4", 32.0, 275.0, 2, "cores", "megacore", TORUS_3D),
    "v5e": ChipSpec("v5e", "TPU v5 lite", 16.0, 197.0, 1, "chips", "default", GRID_2D),
    "v5p": ChipSpec("v5p", "TPU v5", 95.0, 459.0, 2, "cores", "megacore", TORUS_3D),
    "v6e": ChipSpec("v6e", "TPU v6 lite", 32.0, 918.0, 1, "chips", "default", GRID_2D),
}
ALIASES = {"v5litepod": "v5e"}
# Local GPUs: dense bf16 peak of the SXM parts (HBM comes from the device itself).
GPU_PEAK_BF16_TFLOPS = {"A100": 312.0, "H100": 989.0, "H200": 989.0}


@dataclasses.dataclass(frozen=True)
class GpuSpec:
  """An NVIDIA part as XLA's GPU compiler needs it (its `GpuTargetConfig`),
  from the vendor's published figures. Memory: the H100's is XLA's own H100
  spec (what CUDA reports usable); the A100's is taken alike, 79.2 GiB."""
  name: str  # as --topology names it: h100
  device_kind: str
  memory_bytes: int
  peak_bf16_tflops: float  # dense
  compute_capability: tuple[int, int]
  sm_count: int
  clock_ghz: float
  memory_bandwidth: float  # bytes/s
  l2_bytes: int
  shared_memory_per_sm: int
  shared_memory_per_block_optin: int


GPUS = {
    "a100": GpuSpec("a100", "NVIDIA A100-SXM4-80GB", 85_051_572_224, 312.0, (8, 0), 108, 1.41, 2.039e12,
                    40 * 2**20, 167_936, 166_912),
    "h100": GpuSpec("h100", "NVIDIA H100 80GB HBM3", 84_929_347_584, 989.0, (9, 0), 132, 1.98, 3.352e12,
                    50 * 2**20, 233_472, 232_448),
}
GPUS_PER_HOST = 8
GPU_INSTALL_HINT = ("compiling for GPUs without one needs JAX's CUDA plugin on this machine: "
                    "`pip install 'jax[cuda13]'` (a separate environment keeps the tests on the CPU)")


@dataclasses.dataclass
class Target:
  """What a step compiles for. `devices` are one per chip (all slices)."""

  name: str  # "v5e-16", "v5e:4x4 x2 slices", "cpu x8"
  chip: str  # "v5e", or the local device kind
  devices: list
  hbm_bytes_per_chip: int
  peak_flops_per_chip: float | None  # bf16 FLOP/s; None when not known
  num_slices: int = 1

  @property
  def num_chips(self) -> int:
    return len(self.devices)


def parse_topology(name: str) -> tuple[ChipSpec, tuple[int, ...]]:
  """'v5e-16' | 'v5litepod-16' | 'v5p-128' | 'v4-32' | 'v6e-8', or a shape
  'v5e:4x4' / 'v4:2x2x4' (in chips) -> (chip, shape in chips)."""
  valid = ", ".join(sorted(CHIPS))
  match = re.fullmatch(r"(v[0-9a-z]+)(?:-(\d+)|:(\d+(?:x\d+)+))", name.strip().lower())
  chip_name = ALIASES.get(match.group(1), match.group(1)) if match else ""
  if not match or chip_name not in CHIPS:
    raise ValueError(f"--topology={name!r}: expected GENERATION-COUNT (e.g. v5e-16, v5p-128, v4-32, "
                     f"v6e-8) or GENERATION:SHAPE (e.g. v5e:4x4, v4:2x2x4); generations: {valid}")
  chip = CHIPS[chip_name]
  if match.group(3):
    shape = tuple(int(x) for x in match.group(3).split("x"))
    want = len(next(iter(chip.shapes.values())))
    if len(shape) != want:
      raise ValueError(f"--topology={name!r}: a {chip.name} slice shape has {want} dimensions")
    return chip, shape
  count = int(match.group(2))
  cores_each = chip.cores_per_chip if chip.name_counts == "cores" else 1
  if count % cores_each or count // cores_each not in chip.shapes:
    sizes = ", ".join(f"{chip.name}-{n * cores_each}" for n in sorted(chip.shapes))
    raise ValueError(f"--topology={name!r}: no {chip.name} slice of that size (the number counts "
                     f"{chip.name_counts}); known: {sizes}")
  return chip, chip.shapes[count // cores_each]


def parse_gpu_topology(name: str) -> tuple[GpuSpec, int] | None:
  """'h100-8' | 'a100-16' -> (part, number of GPUs), hosts of 8; None for other names."""
  match = re.fullmatch(r"([a-z]\d+)-(\d+)", name.strip().lower())
  if not match or match.group(1) not in GPUS:
    return None
  count = int(match.group(2))
  if count < 1 or (count > GPUS_PER_HOST and count % GPUS_PER_HOST) or count & (count - 1):
    raise ValueError(f"--topology={name!r}: a power of two of GPUs, whole hosts of {GPUS_PER_HOST} past one "
                     f"(e.g. {match.group(1)}-8, {match.group(1)}-16)")
  return GPUS[match.group(1)], count


def gpu_target_config(spec: GpuSpec) -> str:
  """The GpuTargetConfig text proto XLA compiles for when no GPU is present."""
  major, minor = spec.compute_capability
  return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {spec.shared_memory_per_sm}
  threads_per_core_limit: 2048
  core_count: {spec.sm_count}
  fpus_per_core: {128 if major >= 9 else 64}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(spec.memory_bandwidth)}
  l2_cache_size: {spec.l2_bytes}
  clock_rate_ghz: {spec.clock_ghz}
  device_memory_size: {spec.memory_bytes}
  shared_memory_per_block_optin: {spec.shared_memory_per_block_optin}
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 10 }}
runtime_version {{ major: 13 minor: 0 }}
device_description_str: "{spec.device_kind}"
"""


def cuda_plugin_available() -> bool:
  if importlib.util.find_spec("jax_plugins") is None:  # the namespace JAX's plugins install into
    return False
  return any(importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") is not None for v in (13, 12))


def gpu_topology_devices(spec: GpuSpec, count: int) -> list:
  """Compile-only devices of `count` GPUs of that part (hosts of 8), no GPU needed."""
  if not cuda_plugin_available():
    raise RuntimeError(GPU_INSTALL_HINT)
  # The plugin checks the CUDA runtime libraries' versions when it loads;
  # compiling needs none of them at run time. Read when JAX first looks for backends.
  os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
  # Triton GEMM tiling is autotuned on a device; without one, XLA:GPU fails to
  # tile some dots ("Couldn't find output tile sizes"), so dots compile as cuBLAS calls.
  if "xla_gpu_enable_triton_gemm" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_triton_gemm=false").strip()
  from jax.experimental import topologies

  hosts, per_host = max(1, count // GPUS_PER_HOST), min(count, GPUS_PER_HOST)
  try:
    return list(topologies.get_topology_desc(platform="cuda", target_config=gpu_target_config(spec),
                                             topology=f"1x{hosts}x{per_host}").devices)
  except NotImplementedError as e:  # the plugin did not load (JAX's backends were set up before the variable)
    raise RuntimeError(f"JAX's CUDA plugin is installed but did not load: {e}; set "
                       "JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 before JAX starts") from e


def libtpu_available() -> bool:
  return importlib.util.find_spec("libtpu") is not None


def topology_devices(chip: ChipSpec, shape: tuple[int, ...], num_slices: int = 1) -> list:
  """Compile-only devices of `num_slices` slices of that shape, one per chip."""
  if not libtpu_available():
    raise RuntimeError(INSTALL_HINT)
  # Compile-only devices touch no chip, so several processes may hold libtpu
  # at once (without this, a second one fails on libtpu's lockfile). Read
  # when libtpu loads: set before the first JAX backend call to count.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies

  # Hosts of 2x2 chips (v5e/v6e training VMs, every v4/v5p VM); the bound only
  # has to tile the slice, it does not change what a chip compiles.
  host_bounds = (min(2, shape[0]), min(2, shape[1]), 1)
  topology_name = f"{chip.name}:{'x'.join(str(s) for s in shape)}"
  return list(topologies.get_topology_desc(
      platform="tpu", topology_name=topology_name, chip_config_name=chip.chip_config,
      chips_per_host_bounds=host_bounds, num_slices=num_slices).devices)


def _host_memory_bytes() -> int:
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _local_chip(devices) -> tuple[str, int, float | None]:
  """(kind, memory bytes per device, peak bf16 FLOP/s or None) of local devices."""
  import jax

  kind = devices[0].device_kind
  spec = next((c for c in CHIPS.values() if c.device_kind == kind), None)
  stats = None
  try:
    stats = devices[0].memory_stats()
  except Exception:  # backends without memory statistics (CPU) raise or return None
    stats = None
  if stats and stats.get("bytes_limit"):
    memory = int(stats["bytes_limit"])
  elif spec:
    memory = int(spec.hbm_gib * 2**30)
  else:  # CPU devices (real or --xla_force_host_platform_device_count) share the host's RAM
    memory = _host_memory_bytes() // max(1, jax.local_device_count())
  if spec:
    return spec.name, memory, spec.peak_bf16_tflops * 1e12
  peak = next((v for k, v in GPU_PEAK_BF16_TFLOPS.items() if k in kind), None)
  return kind, memory, peak * 1e12 if peak else None


def resolve_target(topology: str = "", num_slices: int = 1, hbm_gib: float = 0.0,
                   peak_tflops: float = 0.0) -> Target:
  """A TPU slice (`topology` given) or this process' devices; `hbm_gib` and
  `peak_tflops` (> 0) replace the chip's figures."""
  if num_slices < 1:
    raise ValueError(f"--num_slices={num_slices}: must be >= 1")
  gpu = parse_gpu_topology(topology) if topology else None
  if gpu:
    spec, count = gpu
    if num_slices > 1:
      raise ValueError("--num_slices > 1 is for TPU slices; name more GPUs instead (e.g. h100-16)")
    target = Target(topology, spec.name, gpu_topology_devices(spec, count), spec.memory_bytes,
                    spec.peak_bf16_tflops * 1e12)
  elif topology:
    chip, shape = parse_topology(topology)
    devices = topology_devices(chip, shape, num_slices)
    name = topology + (f" x{num_slices} slices" if num_slices > 1 else "")
    target = Target(name, chip.name, devices, int(chip.hbm_gib * 2**30), chip.peak_bf16_tflops * 1e12,
                    num_slices)
  else:
    import jax

    if num_slices > 1:
      raise ValueError("--num_slices > 1 needs --topology (the local devices are one slice)")
    devices = jax.devices()
    kind, memory, peak = _local_chip(devices)
    target = Target(f"{devices[0].platform} x{len(devices)}", kind, devices, memory, peak)
  if hbm_gib > 0:
    target.hbm_bytes_per_chip = int(hbm_gib * 2**30)
  if peak_tflops > 0:
    target.peak_flops_per_chip = peak_tflops * 1e12
  return target

