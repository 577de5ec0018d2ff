"""What the pool's fork server imports once, so that a forked worker starts without importing it again.

A fresh interpreter pays ~1.7 s here (2 cores) and ~9 s on a 16-core GPU host under load for ``torch`` and
``torch._dynamo`` alone; a worker forked from a server that already holds them starts in ~0.1 s plus its CUDA
context (~0.3-1 s). Nothing imported here may initialise CUDA, read the plug-in variables or register targets:
the forked child does those itself, in its caller's environment (:func:`harness.runner.worker.fork_unfit`
checks both).

``SERVER_ENV`` is the environment the server started with, taken before any import below could read it, and
``READ_AT_IMPORT`` the variables those imports looked up through ``os.environ`` (torch's, dynamo's and inductor's
configs read ~300): a child whose caller's environment differs from the server's in one of them, or in one that
native libraries read when they load (:data:`harness.runner.worker.NATIVE_IMPORT_ENV`), is started fresh instead.
A failed import is kept in ``PRELOAD_ERROR`` (the server must not die: the child imports what it needs).
"""

import importlib
import os

SERVER_ENV = dict(os.environ)
PRELOAD_ERROR: str | None = None
_read: set[str] = set()


def _preload() -> None:
    environ_type = type(os.environ)
    get, contains = environ_type.__getitem__, environ_type.__contains__

    def recorded_get(self, key):
        _read.add(key)
        return get(self, key)

    def recorded_contains(self, key):
        _read.add(key)
        return contains(self, key)

    environ_type.__getitem__, environ_type.__contains__ = recorded_get, recorded_contains
    try:
        import safetensors.torch  # noqa: F401
        import torch  # noqa: F401

        from harness.runner import worker as _worker

        for mod in _worker.WARM_IMPORTS:
            importlib.import_module(mod)
    finally:
        environ_type.__getitem__, environ_type.__contains__ = get, contains


try:
    _preload()
except Exception as e:  # noqa: BLE001 - a broken import is the child's to report, in its own start
    PRELOAD_ERROR = f"{type(e).__name__}: {e}"
#: what the imports read, also those of an import that then failed
READ_AT_IMPORT: frozenset[str] = frozenset(_read)


def _cuda_driver_initialized() -> bool:
    """Whether ``cuInit`` already ran in this process. Asks only a driver library that is loaded already;
    ``cuDeviceGetCount`` answers CUDA_ERROR_NOT_INITIALIZED (3) without initialising anything."""
    try:
        with open("/proc/self/maps") as f:
            if "libcuda.so" not in f.read():
                return False
        import ctypes

        lib = ctypes.CDLL("libcuda.so.1", mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
        n = ctypes.c_int(0)
        return lib.cuDeviceGetCount(ctypes.byref(n)) == 0
    except (OSError, AttributeError):
        return False


#: asked here, in the server, after its imports: a forked child cannot ask its own driver (CUDA after fork is undefined)
CUDA_INITIALIZED: bool = _cuda_driver_initialized()
