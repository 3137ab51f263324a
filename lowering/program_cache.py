"""Optimized programs on disk, so that a second run skips graphopt's own work.

An entry is one file `programs/<key>.gop` (key: `graphopt.lowering.fingerprint`), written to a
temporary file and renamed into place, so readers see a whole entry or none:

    b"GRAPHOPT-PROGRAM\\0"  8-byte little-endian header size  JSON header  blobs

The JSON header names the key, the versions the entry was built with, and each blob's offset, size
and sha256. The blobs are `jax.export` artifacts (serialized StableHLO): the optimized program,
which takes the flat leaves of the optimized graph's arguments, and, when passes moved work on the
weights into a prep graph (fold_params, quantization), the prep program, which takes the original
parameter leaves. The header says how the prep program's results become the optimized graph's
parameter dict. No pickle: JSON and jax.export bytes only.

Loading checks the magic, the sizes, every hash, the key and the versions, deserializes the
artifacts and their shapes; an entry that fails any check is deleted (logged at debug level)
and the caller rebuilds it.

Example:
    >>> import graphopt, jax.numpy as jnp, tempfile, pathlib
    >>> from graphopt.lowering import fingerprint, program_cache
    >>> f, x = (lambda x: jnp.tanh(x) * 2), jnp.zeros(3)
    >>> fp = fingerprint.fingerprint(f, x)
    >>> graph = graphopt.run_pipeline(graphopt.trace(f, x), "default").graph
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> path = program_cache.write(folder, fp, program_cache.build_entry(graph, fp))
    >>> program = program_cache.load(folder, fp)
    >>> program(x).tolist()
    [0.0, 0.0, 0.0]
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import tempfile
from typing import Any

import jax
from jax import export as jax_export

from graphopt import _jax_compat as compat
from graphopt.errors import SignatureError
from graphopt.ir import Graph
from graphopt.lowering.fingerprint import Fingerprint
from graphopt.param_prep import check_finite, replace_params

logger = logging.getLogger("graphopt.cache")

MAGIC = b"GRAPHOPT-PROGRAM\0"
SUFFIX = ".gop"


class EntryError(ValueError):
    """A stored entry that cannot be used: truncated, corrupt, from another version or key."""


def build_entry(graph: Graph, fp: Fingerprint) -> bytes:
    """The bytes of an entry for the optimized `graph`. Raises if jax.export cannot export it
    (a host callback, a custom call jax.export refuses): the caller then runs without the cache."""
    from graphopt.lowering.emit import lower
    from graphopt.lowering.export import input_specs

    platforms = (fp.versions["platform"],)
    specs = jax.tree_util.tree_leaves(input_specs(graph))
    blobs = {"program": jax_export.export(jax.jit(lower(graph).flat), platforms=platforms)(*specs).serialize()}
    prep = None
    if graph.prep is not None:
        prep, prep_blob = _prep_entry(graph.prep, platforms)
        if prep_blob is not None:
            blobs["prep"] = prep_blob
    header: dict[str, Any] = {"key": fp.key, "versions": fp.versions, "outputs": len(graph.outputs),
                              "weak_outputs": [bool(v.type.weak_type) for v in graph.outputs],
                              "prep": prep, "blobs": {}}
    offset = 0
    for name, blob in blobs.items():
        header["blobs"][name] = {"offset": offset, "size": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
        offset += len(blob)
    text = json.dumps(header, sort_keys=True).encode()
    return b"".join([MAGIC, len(text).to_bytes(8, "little"), text, *map(bytes, blobs.values())])


def write(folder: pathlib.Path, fp: Fingerprint, data: bytes, max_bytes: int | None = None) -> pathlib.Path:
    """Store an entry atomically: a temporary file in the same folder, renamed into place. With
    `max_bytes`, then evict the least recently used other entries past that total (`evict`)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (fp.key + SUFFIX)
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=SUFFIX)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    if max_bytes is not None:
        evict(folder, max_bytes, keep=path)
    return path


def evict(folder: pathlib.Path, max_bytes: int, keep: pathlib.Path | None = None) -> list[pathlib.Path]:
    """Delete the least recently used entries (by modification time: `load` touches an entry it
    uses) until the folder's entries total at most `max_bytes`; `keep` is never deleted.
    Returns the deleted paths. Entries another process deletes meanwhile are skipped.

    >>> import pathlib, tempfile, os
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> for i, name in enumerate("abc"):
    ...     _ = (folder / f"{name}.gop").write_bytes(b"x" * 100)
    ...     os.utime(folder / f"{name}.gop", (i, i))
    >>> [p.name for p in evict(folder, 250)], sorted(p.name for p in folder.iterdir())
    (['a.gop'], ['b.gop', 'c.gop'])
    """
    entries = []
    for path in folder.glob("*" + SUFFIX):
        try:
            info = path.stat()
        except OSError:
            continue
        entries.append((info.st_mtime, info.st_size, path))
    total = sum(size for _, size, _ in entries)
    deleted = []
    for _, size, path in sorted(entries, key=lambda e: e[0]):  # oldest first
        if total <= max_bytes:
            break
        if keep is not None and path == keep:
            continue
        try:
            path.unlink()
        except OSError:
            continue
        total -= size
        deleted.append(path)
        logger.debug("program cache: evicted %s (%d bytes) to stay under %d bytes", path, size, max_bytes)
    return deleted


def load(folder: pathlib.Path, fp: Fingerprint) -> "StoredProgram | None":
    """The stored program for `fp`, or None: missing, or found unusable and deleted."""
    path = folder / (fp.key + SUFFIX)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as err:
        logger.debug("program cache: cannot read %s (%s)", path, err)
        return None
    try:
        program = parse(data, fp)
    except Exception as err:  # noqa: BLE001  (any failure to load means: rebuild)
        logger.debug("program cache: entry %s is unusable (%s: %s); deleted, rebuilding",
                     path, type(err).__name__, err)
        from graphopt.lowering import cache

        cache.count("program_rejected")
        try:
            path.unlink()
        except OSError:
            pass
        return None
    try:
        os.utime(path)  # recently used: evicted last
    except OSError:
        pass
    return program


def parse(data: bytes, fp: Fingerprint) -> "StoredProgram":
    """Check and load an entry's bytes (see the module docstring); raises EntryError."""
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 8:
        raise EntryError("not a graphopt program entry")
    start = len(MAGIC) + 8
    size = int.from_bytes(data[len(MAGIC):start], "little")
    if start + size > len(data):
        raise EntryError("truncated header")
    header = json.loads(data[start:start + size])
    if header.get("key") != fp.key:
        raise EntryError("the entry is for another key")
    if header.get("versions") != fp.versions:
        raise EntryError(f"built with {header.get('versions')}, this process runs {fp.versions}")
    body, blobs = data[start + size:], {}
    for name, where in header["blobs"].items():
        blob = body[where["offset"]:where["offset"] + where["size"]]
        if len(blob) != where["size"] or hashlib.sha256(blob).hexdigest() != where["sha256"]:
            raise EntryError(f"blob {name!r} is truncated or corrupt")
        blobs[name] = jax_export.deserialize(bytearray(blob))
    program = blobs["program"]
    if len(program.out_avals) != header["outputs"] or fp.out_tree.num_leaves != header["outputs"]:
        raise EntryError(f"the program returns {len(program.out_avals)} values, the model {fp.out_tree.num_leaves}")
    prep = None if header["prep"] is None else StoredPrep(header["prep"], blobs.get("prep"))
    weak = header["weak_outputs"]
    if len(weak) != header["outputs"]:
        raise EntryError("the header's output types do not match its output count")
    return StoredProgram(program, prep, fp.out_tree, weak)


class StoredProgram:
    """An optimized program loaded from the cache: call it with the optimized graph's arguments
    (`prep.arguments(prep.params(*args), args)` of the traced arguments when `prep` is not None);
    it returns the model's output pytree."""

    def __init__(self, exported, prep: "StoredPrep | None", out_tree, weak_outputs: list):
        self.prep = prep
        self.out_tree = out_tree
        weak = list(weak_outputs)

        def call(*leaves):
            # jax.export does not keep weak types; they decide later promotions, so restore them.
            outputs = exported.call(*leaves)
            return [compat.make_constant(o, o.dtype, True) if w else o for o, w in zip(outputs, weak)]

        self._call = jax.jit(call)

    def __call__(self, *args):
        outputs = self._call(*jax.tree_util.tree_leaves(args))
        return jax.tree_util.tree_unflatten(self.out_tree, outputs)


class StoredPrep:
    """The stored form of a `graphopt.param_prep.ParamPrep`, with the same `params` / `arguments`."""

    def __init__(self, meta: dict, exported):
        self.param_leaf_indices = tuple(meta["param_leaf_indices"])
        self.param_argnums = tuple(meta["param_argnums"])
        self.keys = tuple(meta["keys"])
        self.sources = [tuple(s) for s in meta["sources"]]  # ("input", leaf) or ("output", result)
        self.finite = {k: text for k, text in meta["finite"]}
        if exported is None and any(kind == "output" for kind, _ in self.sources):
            raise EntryError("the prep program is missing")
        self._call = None if exported is None else jax.jit(exported.call)

    def params(self, *args) -> dict:
        flat = jax.tree_util.tree_leaves(args)
        if max(self.param_leaf_indices, default=-1) >= len(flat):
            raise SignatureError(f"expected at least {max(self.param_leaf_indices) + 1} argument leaves, got {len(flat)}")
        leaves = [flat[i] for i in self.param_leaf_indices]
        results = self._call(*leaves) if self._call is not None else []
        params = {key: leaves[i] if kind == "input" else results[i]
                  for key, (kind, i) in zip(self.keys, self.sources)}
        for key, reason in self.finite.items():  # as ParamPrep's own check
            check_finite(key, params[key], reason)
        return params

    def arguments(self, params: dict, args: tuple) -> tuple:
        return replace_params(self.param_argnums, params, args)


def _prep_entry(prep, platforms) -> tuple[dict, bytearray | None]:
    """(JSON metadata, prep program artifact or None) for a ParamPrep."""
    from graphopt.lowering.emit import evaluate

    graph = prep.graph
    passed = {id(a): a.index for a in graph.inputs}
    computed = [i for i, v in enumerate(graph.outputs) if id(v) not in passed]
    sources = [["input", passed[id(v)]] if id(v) in passed else ["output", computed.index(i)]
               for i, v in enumerate(graph.outputs)]
    finite = [list(item) for item in prep.finite_requirements().items()]
    meta = {"param_leaf_indices": list(prep.param_leaf_indices), "param_argnums": list(prep.param_argnums),
            "keys": list(prep.keys), "sources": sources, "finite": finite}
    if not computed:
        return meta, None

    def run(*leaves):
        outs = evaluate(graph, leaves)
        return [outs[i] for i in computed]

    specs = [jax.ShapeDtypeStruct(a.type.shape, a.type.dtype, weak_type=a.type.weak_type) for a in graph.inputs]
    return meta, jax_export.export(jax.jit(run), platforms=platforms)(*specs).serialize()
