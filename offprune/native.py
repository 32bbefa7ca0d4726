"""offprune's compiled chain loops (`_chain.cpp`), built with torch's C++ extension tools on first use.

A fused chain's forward pass and backward body (offprune.sparse) run as one C++ call each when the
build works, and as the same loops in Python when it does not (no C++ compiler, a failed build, or
OFFPRUNE_NATIVE=0). Both compute the same bits: the C++ loop calls the same torch operators in the
same order, except two products of its own that add up exactly as torch's do: the CSR product
accumulates each output element as torch's embedding bag does (a chain of fused multiply-adds in
CSR order), and the weight gradient's dot products add up as torch's sparse_sampled_addmm does (8
float lanes, then its lane tree; `sampled_dots_match` checks this against torch on load, and where
it fails the loop keeps torch's operator). It is faster because of no interpreter or binding cost
per operator (a training chain is an autograd node written in C++, `chains_apply`); wide
graph-free passes in row blocks inside one call; products that align wide batches and apply the
bias, ReLU and ReLU's gradient in registers (on CPUs with AVX-512 or AVX2 and FMA; elsewhere the
embedding bag); dense products that fill their bias rows themselves; the GIL released for the whole pass; and, under
`offprune.sparse.sparse_threads(n)`, large products shared with n - 1 helper threads that keep
polling for work between products (waking a sleeping thread took ~150 us on the machines measured).

The build (~30 s, once per machine, source version and torch version) goes to a fresh temporary
folder and the library is then moved into OFFPRUNE_CACHE (default ~/.cache/offprune), so parallel
processes never wait on each other's lock files and an interrupted build leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Iterator

import torch

# Layer kinds, numbered as in _chain.cpp.
CSR, MATRIX, LINEAR = 0, 1, 2
GRAD_CSR, GRAD_DENSE_PRODUCT, GRAD_LINEAR = 0, 1, 2
RELU, ELU = 1, 2

SOURCE = Path(__file__).with_name("_chain.cpp")
MODULE_NAME = "offprune_chain"  # the name the library's PYBIND11_MODULE is built under
GATHER_EVENT = "offprune::csr_gather"  # the profiler's name for the C++ CSR product
SAMPLED_EVENT = "offprune::sampled_product"  # ... and for its weight-gradient dot products
ENV_SWITCH = "OFFPRUNE_NATIVE"  # "0": never build or use the C++ loops
ENV_CACHE = "OFFPRUNE_CACHE"
CFLAGS = ("-O3",)  # part of the library's key: other flags, another build

_lock = threading.Lock()
_state: dict[str, object] = {"tried": False, "module": None, "enabled": True}


def cache_dir() -> Path:
    return Path(os.environ.get(ENV_CACHE) or Path.home() / ".cache" / "offprune")


def library_path() -> Path:
    """Where the built library lives: one file per source, torch and Python version."""
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(CFLAGS).encode() + torch.__version__.encode()
                         + sys.version.encode()).hexdigest()[:16]
    return cache_dir() / f"{MODULE_NAME}-{key}.so"


def _import(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(MODULE_NAME, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _compile(target: Path) -> ModuleType:
    """Build the library in a temporary folder, copy it to `target` (atomically), return it loaded."""
    from torch.utils.cpp_extension import load

    try:  # the ninja package's binary is on PATH only inside an activated virtual environment
        import ninja
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="offprune-build-") as build:
        module = load(name=MODULE_NAME, sources=[str(SOURCE)], extra_cflags=list(CFLAGS), build_directory=build,
                      verbose=False)
        staged = target.with_name(f".{target.name}.{os.getpid()}")
        shutil.copyfile(Path(build) / f"{MODULE_NAME}.so", staged)
        os.replace(staged, target)
    return module


def _load() -> ModuleType | None:
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return None
    target = library_path()
    try:
        module = None
        if target.exists():
            try:
                module = _import(target)
            except ImportError:  # a damaged file: build it again
                pass
        if module is None:
            _notice(f"building offprune's C++ chain loops into {target} (once per machine and version, ~30 s)")
            module = _compile(target)
        module.use_sampled_dots(sampled_dots_match(module))
        return module
    except Exception as err:  # no compiler, a failed build: the Python loops compute the same
        lines = str(err).strip().splitlines()
        _notice(f"offprune's C++ chain loops are unavailable ({lines[-1] if lines else type(err).__name__}): "
                "sparse kernels run their Python loops, which compute the same bits more slowly")
        return None


def sampled_dots_match(module: ModuleType) -> bool:
    """Whether the library's weight-gradient dot products give torch's sparse_sampled_addmm bits on
    this machine (they follow the summation order of torch's AVX2 kernel), checked on batch widths
    that take each of its paths: fewer than 8 columns, whole vectors, a partial last vector."""
    generator = torch.Generator().manual_seed(0)
    rows, cols = 7, 9
    mask = torch.rand(rows, cols, generator=generator) < 0.5
    mask[3] = False  # an empty row
    row_index, col_index = mask.nonzero(as_tuple=True)
    crow = torch.zeros(rows + 1, dtype=torch.int32)
    crow[1:] = torch.cumsum(torch.bincount(row_index, minlength=rows), 0)
    with warnings.catch_warnings():  # torch's notice that CSR support is in beta
        warnings.simplefilter("ignore")
        pattern = torch.sparse_csr_tensor(crow, col_index.to(torch.int32), torch.zeros(len(col_index)), (rows, cols))
    for batch in (1, 5, 8, 9, 16, 31, 100, 256, 1000):
        grad_t = torch.randn(rows, batch, generator=generator)
        grad_t[0] = 0.0  # -0.0 products: torch's result is +0.0
        h_t = torch.randn(cols, batch, generator=generator)
        own = module.own_sampled_product(grad_t, h_t, pattern)
        torchs = torch.sparse.sampled_addmm(pattern, grad_t, h_t.T, beta=0.0).values()
        if own is None or not torch.equal(own.view(torch.int32), torchs.view(torch.int32)):  # bits, zeros' signs too
            return False
    return True


def _notice(message: str) -> None:
    """One line on stderr: the build pauses the first sparse run for ~30 s, and a failed one slows
    every sparse run down, so the user hears of either (logging is not set up by the CLI)."""
    print(message, file=sys.stderr, flush=True)


def chain_kernels() -> ModuleType | None:
    """The compiled module, built or loaded on first use; None when switched off or unavailable."""
    if not _state["enabled"]:
        return None
    if not _state["tried"]:
        with _lock:
            if not _state["tried"]:
                _state["module"] = _load()
                _state["tried"] = True
    return _state["module"]  # type: ignore[return-value]


def loaded_kernels() -> ModuleType | None:
    """The compiled module if a sparse network has already loaded it, else None (never builds)."""
    return _state["module"] if _state["enabled"] and _state["tried"] else None  # type: ignore[return-value]


@contextmanager
def python_loops() -> Iterator[None]:
    """Inside the block, chains run their Python loops (to compare the two)."""
    previous = _state["enabled"]
    _state["enabled"] = False
    try:
        yield
    finally:
        _state["enabled"] = previous
