"""graphopt's exceptions. Each says what went wrong, where (op, module path, source line), and what to do.

Example:
    >>> raise TraceError("cannot trace f: ...")  # doctest: +SKIP
"""

from __future__ import annotations


class GraphoptError(Exception):
    """Base class of every error graphopt raises on purpose."""


class GraphError(GraphoptError):
    """A graph invariant is broken, or a rewrite asked for something the IR cannot hold.

    When a node is given, the message ends with its op, module path and source line.
    """

    def __init__(self, message: str, node=None):
        self.node = node
        where = ""
        if node is not None and getattr(node, "provenance", None) is not None:
            where = f"\n  at node {node.op.name} ({node.provenance.describe()})"
        super().__init__(message + where)


class TraceError(GraphoptError):
    """A function could not be traced into a graph."""


class SignatureError(GraphoptError, TypeError):
    """A lowered graph was called with arguments that do not match the traced signature."""


class PrepError(GraphoptError, ValueError):
    """Parameters that cannot be prepared for an optimized graph (NaN weights where quantization
    needs finite ones)."""


class TargetError(GraphoptError, ValueError):
    """A compilation target that is malformed or not available here (`graphopt.compile`)."""


class GraphoptWarning(UserWarning):
    """Base class of every warning graphopt issues."""


class ValidationWarning(GraphoptWarning):
    """Translation validation found that a pass changed the program's results; the pass was
    reverted. The message names the pass, the first diverging node and the error."""


class ValidationError(GraphoptError):
    """A pass changed the program's results (raised instead of reverting, with
    `Validator(on_mismatch="raise")` and by `bisect`). Carries `pass_name`, `node` (the first
    diverging node, described) and `error` (the max relative error measured)."""

    def __init__(self, message: str, pass_name: str, node: str | None, error: float):
        super().__init__(message)
        self.pass_name, self.node, self.error = pass_name, node, error
