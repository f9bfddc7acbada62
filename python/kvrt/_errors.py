"""Exceptions: one subclass of KvrtError per kvrt_status (api/include/kvrt.h, docs/errors.md).

Every failed call raises the subclass of its status, carrying the status, its C name and the
library's message (kvrt_last_error()) or, for what the binding checks itself before calling the
library (a tensor's dtype, shape, contiguity or device), the binding's message. Each subclass also
derives from the closest built-in exception, so `except ValueError` catches a bad argument.
"""

from __future__ import annotations


class KvrtError(Exception):
    """A kvrt call failed. `status` is the kvrt_status value, `status_name` its C name
    ("KVRT_ERR_INVALID_ARGUMENT", ...), `call` the method that failed and `message` the
    library's kvrt_last_error() text."""

    status: int = -1
    status_name: str = "KVRT_ERR_UNKNOWN_STATUS"

    def __init__(self, message: str, call: str = "", status: int | None = None):
        if status is not None:
            self.status = status
        self.call = call
        self.message = message
        prefix = f"{call}: " if call else ""
        super().__init__(f"{prefix}{self.status_name}: {message}")


class InvalidArgumentError(KvrtError, ValueError):
    """KVRT_ERR_INVALID_ARGUMENT: a null pointer, a shape, dtype or value out of range."""
    status, status_name = 1, "KVRT_ERR_INVALID_ARGUMENT"


class NotFoundError(KvrtError, LookupError):
    """KVRT_ERR_NOT_FOUND: an unknown or released sequence."""
    status, status_name = 2, "KVRT_ERR_NOT_FOUND"


class OutOfMemoryError(KvrtError, MemoryError):
    """KVRT_ERR_OUT_OF_MEMORY: an allocation or a configured memory budget failed."""
    status, status_name = 3, "KVRT_ERR_OUT_OF_MEMORY"


class FailedPreconditionError(KvrtError, RuntimeError):
    """KVRT_ERR_FAILED_PRECONDITION: valid call in the wrong state (prefill twice, attend on an
    empty layer, a closed runtime)."""
    status, status_name = 4, "KVRT_ERR_FAILED_PRECONDITION"


class UnimplementedError(KvrtError, NotImplementedError):
    """KVRT_ERR_UNIMPLEMENTED: a feature this build does not have (e.g. use_gpu=1 without CUDA)."""
    status, status_name = 5, "KVRT_ERR_UNIMPLEMENTED"


class InternalError(KvrtError, RuntimeError):
    """KVRT_ERR_INTERNAL: a bug in kvrt; please report it with the message."""
    status, status_name = 6, "KVRT_ERR_INTERNAL"


class CudaError(KvrtError, RuntimeError):
    """KVRT_ERR_CUDA: a CUDA runtime error."""
    status, status_name = 7, "KVRT_ERR_CUDA"


class KvrtIOError(KvrtError, OSError):
    """KVRT_ERR_IO: a file could not be read or written, or is corrupt."""
    status, status_name = 8, "KVRT_ERR_IO"


ERRORS: dict[int, type[KvrtError]] = {
    c.status: c for c in (InvalidArgumentError, NotFoundError, OutOfMemoryError,
                          FailedPreconditionError, UnimplementedError, InternalError, CudaError,
                          KvrtIOError)
}


def make_error(status: int, call: str, message: str) -> KvrtError:
    """The exception for a failed call (used by the extension)."""
    cls = ERRORS.get(status)
    if cls is None:
        return KvrtError(message, call, status)
    return cls(message, call)
