"""graphopt's saved artifacts: safetensors files with a format name and version (never pickle).

Quantized models (`graphopt.quant.artifact`), pruned models (`graphopt.pruning.model`) and sparse
checkpoints (`graphopt.pruning.masks`) share this: arrays by name, string metadata (JSON inside),
dtypes that safetensors' numpy side cannot hold (float8, int4, ...) stored as their bits and
restored on reading, files replaced atomically, and reading errors that say which file and why.

Example:
    >>> import os, tempfile, numpy as np, ml_dtypes
    >>> file = os.path.join(tempfile.mkdtemp(), "a.safetensors")
    >>> write(file, {"w": np.ones(2, ml_dtypes.float8_e4m3fn)}, {"note": "hi"}, format="demo", version=1)
    >>> arrays, meta = read(file, format="demo", version=1, what="a demo file", error=ValueError)
    >>> arrays["w"].dtype.name, meta["note"]
    ('float8_e4m3fn', 'hi')
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

# dtypes kept as their bits: safetensors' numpy API has no such types
_BIT_DTYPES = ("float8", "float4", "int4", "uint4", "int2", "uint2")


def write(path, arrays: dict, metadata: dict, *, format: str, version: int) -> None:
    """Write `arrays` (name -> array) and `metadata` (name -> str) to `path`, replaced atomically."""
    from safetensors.numpy import save_file

    tensors, bits = {}, {}
    for key, array in arrays.items():
        array = np.asarray(jax.device_get(array))
        if array.dtype.name.startswith(_BIT_DTYPES):
            bits[key] = array.dtype.name
            array = array.view(np.dtype(f"uint{array.dtype.itemsize * 8}"))
        tensors[key] = np.ascontiguousarray(array) if array.ndim else array
    header = {**metadata, "format": format, "version": str(version), "bits": json.dumps(bits)}
    tmp = f"{os.fspath(path)}.tmp-{os.getpid()}"
    save_file(tensors, tmp, metadata=header)
    os.replace(tmp, path)


def read(path, *, format: str, version: int, what: str, error: type) -> tuple[dict, dict]:
    """(arrays, metadata) of a file written by `write` with this format and version; `error`
    (naming the file and `what` it should be) for any other file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(os.fspath(path), "np") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != format:
                raise error(f"{path}: not {what} (format {metadata.get('format')!r}, expected {format!r})")
            if metadata.get("version") != str(version):
                raise error(f"{path}: format version {metadata.get('version')!r} is not supported by this "
                            f"graphopt (it reads {version}); upgrade graphopt")
            bits = json.loads(metadata.get("bits", "{}"))
            arrays = {}
            for key in f.keys():
                array = f.get_tensor(key)
                arrays[key] = array.view(jax.numpy.dtype(bits[key])) if key in bits else array
    except (SafetensorError, OSError) as err:
        raise error(f"{path}: cannot read a safetensors file: {err}") from err
    return arrays, metadata
