"""Every CPU workaround the trainer needs to run megatron-core with gloo and no CUDA, in one place.

megatron-core assumes a CUDA device in a handful of places that a CPU run reaches (measured on 0.16.1,
see the project's findings): ``torch.cuda.current_device()`` used as a device for buffers,
``torch.cuda.synchronize()`` / ``current_stream()`` calls, tensors created with a hard-coded
``device="cuda"``, ``Tensor.cuda()`` in the tied-embedding sync, CUDA RNG trackers (and the CUDA generator state
that activation recomputation saves), a gradient clip that asserts ``torch.cuda.FloatTensor``, and the
mixed-precision optimizers' constructors, which sort parameters by CUDA type names (so ``--bf16``/``--fp16`` run
megatron-core's own ``Float16Module``, fp32 main parameters, loss scaler and distributed optimizer on CPU).
:func:`activate` neutralises exactly those and nothing else, and only when no CUDA device is present, so a GPU run
never goes through this module.

On a machine without CUDA each patched call would otherwise raise, so redirecting it to the CPU cannot change
the behaviour of code that worked before.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import types

import torch

logger = logging.getLogger(__name__)

_ACTIVE = False

# megatron-core modules that create tensors with a literal ``device="cuda"`` on paths a CPU run takes
# (pipeline schedules' token counters, DDP buffer warm-up, optimizer scalars, grad-norm helpers, the
# checkpoint saver's consistency checks). Each gets a thin ``torch`` stand-in that maps that device to CPU.
_MODULES_WITH_CUDA_LITERALS = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.utils",
    "megatron.core.transformer.utils",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.exchange_utils",
)

_FACTORIES = frozenset(
    {"zeros", "ones", "empty", "full", "tensor", "arange", "zeros_like", "ones_like", "empty_like", "full_like"}
)


# Warnings megatron-core prints on every CPU run that say nothing actionable there (no Transformer Engine or apex,
# CUDA-only tuning hints); each process would print them all, burying the training log.
_CPU_NOISE = (
    r".*Transformer Engine and Apex are not installed.*",
    r".*Apex is not installed.*",
    r".*CUDA_DEVICE_MAX_CONNECTIONS.*",
    r".*full scope is deprecated.*",
)


def quiet_cpu_warnings() -> None:
    """Hide megatron-core's CPU-irrelevant warnings (call before importing megatron); no-op with CUDA."""
    if not cpu_only():
        return
    import warnings

    for pattern in _CPU_NOISE:
        warnings.filterwarnings("ignore", message=pattern)


def is_active() -> bool:
    """True once :func:`activate` has patched megatron-core for a CPU run."""
    return _ACTIVE


def cpu_only() -> bool:
    """True when this process has no usable CUDA device (the case this module exists for)."""
    return not torch.cuda.is_available()


def _to_cpu_device(device):
    if device is None:
        return None
    if isinstance(device, int):
        return torch.device("cpu")
    if str(device).startswith("cuda"):
        return torch.device("cpu")
    return device


def _redirect_device(fn):
    def wrapper(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        kwargs.pop("pin_memory", None)  # pinning needs a CUDA runtime
        return fn(*args, **kwargs)

    wrapper.__name__ = getattr(fn, "__name__", "factory")
    wrapper.__doc__ = fn.__doc__
    return wrapper


class _CpuTorch(types.ModuleType):
    """Stand-in for ``torch`` inside selected megatron modules: factories never target CUDA."""

    def __init__(self, real):
        super().__init__("torch")
        self._real = real
        self._wrapped = {name: _redirect_device(getattr(real, name)) for name in _FACTORIES}

    def __getattr__(self, name):
        wrapped = self.__dict__.get("_wrapped", {})
        if name in wrapped:
            return wrapped[name]
        return getattr(self._real, name)


class _NullStream:
    """What ``torch.cuda.current_stream()`` returns on CPU: every stream operation is a no-op."""

    def wait_stream(self, *_a, **_k):
        return None

    def record_event(self, *_a, **_k):
        return None

    def synchronize(self):
        return None

    def wait_event(self, *_a, **_k):
        return None


def _cpu_clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """CPU version of megatron's ``clip_grad_by_total_norm_fp32`` (whose type assert names CUDA)."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff >= 1.0:
        return
    for param in parameters:
        grad = getattr(param, "decoupled_grad", None) if use_decoupled_grad else param.grad
        if grad is not None:
            grad.detach().mul_(clip_coeff)


def _patch_torch_cuda():
    # Only ever reached when torch.cuda.is_available() is False: these calls would raise otherwise.
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.current_stream = lambda *a, **k: _NullStream()
    torch.cuda.default_stream = lambda *a, **k: _NullStream()
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()
    torch.cuda.set_device = lambda *a, **k: None
    torch.cuda.nvtx.range_push = lambda *a, **k: None
    torch.cuda.nvtx.range_pop = lambda *a, **k: None

    def _identity_cuda(self, device=None, non_blocking=False, memory_format=torch.preserve_format):
        return self

    # The tied-embedding initial broadcast (PP > 1) and checkpoint exchange call ``.cuda()``.
    torch.Tensor.cuda = _identity_cuda


_CUDA_TYPE_NAMES = {"torch.FloatTensor": "torch.cuda.FloatTensor", "torch.HalfTensor": "torch.cuda.HalfTensor",
                    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor"}

# megatron-core's mixed-precision optimizers sort parameters into fp16/bf16 and fp32 groups by comparing
# ``param.type()`` with CUDA tensor type names, and raise TypeError for anything else (a CPU tensor). Only their
# constructors do this; they run with CPU tensors reporting the CUDA names, which sorts them by dtype exactly as a
# GPU run would. (class path, a string the constructor's source must contain: the tripwire)
MIXED_PRECISION_OPTIMIZERS = (
    ("megatron.core.optimizer.optimizer.Float16OptimizerWithFloat16Params", "'torch.cuda.BFloat16Tensor'"),
    ("megatron.core.optimizer.distrib_optimizer.DistributedOptimizer", "'torch.cuda.BFloat16Tensor'"),
)


@contextlib.contextmanager
def _cuda_type_names():
    """While active, ``Tensor.type()`` (no arguments) names CPU float tensors as their CUDA types."""
    real = torch.Tensor.type

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = real(self)
            return _CUDA_TYPE_NAMES.get(name, name)
        return real(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_
    try:
        yield
    finally:
        torch.Tensor.type = real


def _with_cuda_type_names(fn):
    def wrapper(*args, **kwargs):
        with _cuda_type_names():
            return fn(*args, **kwargs)

    wrapper.__wrapped__ = fn
    wrapper.__name__ = getattr(fn, "__name__", "wrapper")
    wrapper.__doc__ = fn.__doc__
    return wrapper


def _resolve(path: str):
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def mixed_precision_tripwire() -> list:
    """What changed in megatron-core under the mixed-precision shim: one line per optimizer class that moved or no
    longer sorts parameters by CUDA type names (empty when the shim matches this release)."""
    import inspect

    problems = []
    for path, marker in MIXED_PRECISION_OPTIMIZERS:
        try:
            cls = _resolve(path)
        except (ImportError, AttributeError) as exc:
            problems.append(f"{path} not found ({exc})")
            continue
        source = inspect.getsource(inspect.getmodule(cls))
        if marker not in source:
            problems.append(f"{path}: its module no longer compares param.type() with {marker}")
    return problems


def _patch_mixed_precision_optimizers():
    problems = mixed_precision_tripwire()
    if problems:
        # A bf16/fp16 run on CPU would fail or misbehave in the optimizer: say what moved instead.
        raise RuntimeError("megatron_anchor.cpu_compat: megatron-core changed under the CPU mixed-precision shim; "
                           "--bf16/--fp16 on CPU need it updated: " + "; ".join(problems))
    for path, _ in MIXED_PRECISION_OPTIMIZERS:
        cls = _resolve(path)
        if not hasattr(cls.__init__, "__wrapped__"):
            cls.__init__ = _with_cuda_type_names(cls.__init__)


def _patch_megatron_modules():
    for name in _MODULES_WITH_CUDA_LITERALS:
        try:
            module = importlib.import_module(name)
        except ImportError:  # module moved in another megatron-core release: nothing to patch there
            continue
        if isinstance(getattr(module, "torch", None), types.ModuleType) and not isinstance(
            module.torch, _CpuTorch
        ):
            module.torch = _CpuTorch(torch)

    # Activation recomputation saves and restores every RNG state around a recomputed layer, the CUDA generator's
    # included; without CUDA there is none (dropout draws from the CPU generator, which is saved and restored).
    random_module = importlib.import_module("megatron.core.tensor_parallel.random")
    if hasattr(random_module, "_get_cuda_rng_state") and hasattr(random_module, "_set_cuda_rng_state"):
        random_module._get_cuda_rng_state = lambda *a, **k: torch.empty(0, dtype=torch.uint8)
        random_module._set_cuda_rng_state = lambda *a, **k: None
    else:  # moved in another megatron-core release: recomputation on CPU fails (tests/training/test_fast_path.py)
        logger.warning("megatron_anchor.cpu_compat: megatron-core's CUDA RNG helpers moved; activation "
                       "recomputation will not run on CPU")

    _patch_mixed_precision_optimizers()

    # Grad clipping: megatron imports the function by name into the optimizer module, so replace both.
    for name in ("megatron.core.optimizer.clip_grads", "megatron.core.optimizer.optimizer"):
        module = importlib.import_module(name)
        if hasattr(module, "clip_grad_by_total_norm_fp32"):
            module.clip_grad_by_total_norm_fp32 = _cpu_clip_grad_by_total_norm_fp32


def activate() -> bool:
    """Patch megatron-core for a CPU-only run; a no-op (returns False) when CUDA is available.

    Safe to call more than once. Must run before the model, DDP wrapper or optimizer are built.
    """
    global _ACTIVE
    if _ACTIVE:
        return True
    if not cpu_only():
        return False
    _patch_torch_cuda()
    _patch_megatron_modules()
    _ACTIVE = True
    logger.info("megatron_anchor.cpu_compat: CPU workarounds active (no CUDA device)")
    return True


def seed_model_parallel_rng(seed: int) -> None:
    """Seed megatron's tensor-parallel RNG tracker.

    On CPU the default tracker reads CUDA generator state; the inference tracker does not (dropout inside
    tensor-parallel regions then draws from the CPU generator, which the trainer seeds per rank).
    """
    from megatron.core import tensor_parallel

    if cpu_only():
        tensor_parallel.model_parallel_cuda_manual_seed(seed, inference_rng_tracker=True, force_reset_rng=True)
    else:
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
