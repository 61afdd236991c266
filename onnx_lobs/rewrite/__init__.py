"""Graph rewrites as small rules on onnx-ir, one rule per module, each with a test beside it that
runs the model in onnxruntime before and after.

A rule says first whether it applies to its target and why not (`check`), then changes the
model in place (`apply`). Rules work on an ir.Model: the graph index (index.py) reads the same
representation, and onnx-ir writes the result back to a ModelProto.
"""

from __future__ import annotations

from typing import Any, Protocol

import onnx
import onnx_ir as ir

from ..index import write_ir


class Rule(Protocol):
    name: str

    def check(self, model: ir.Model, target: Any) -> str | None:
        """Why the rule does not apply to this target, or None when it does."""

    def apply(self, model: ir.Model, target: Any) -> Any:
        """Change the model in place (only after check said yes); returns what the caller needs."""


class RewriteError(ValueError):
    """A rule applied where its check says it does not: a bug in the caller, not a user mistake."""


def apply(rule: Rule, model: ir.Model, target: Any) -> Any:
    why = rule.check(model, target)
    if why is not None:
        raise RewriteError(f"{rule.name}: {why}")
    return rule.apply(model, target)


def to_proto(model: ir.Model, original: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """The rewritten model as a protobuf, with what onnx-ir drops put back from the model it was
    read from (index.write_ir)."""
    return write_ir(model, original)
