"""``mmfuse.patch(model)``: swap every recognised module for its mmfuse drop-in, in place.

Each module family registers a ``Rule``: a predicate on a module and a factory that builds the
replacement with ``from_module`` (sharing parameters). ``patch`` walks the model once, replaces what a
rule recognises, and returns a report of what it swapped.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch.nn as nn


@dataclasses.dataclass(frozen=True)
class Rule:
    name: str
    matches: Callable[[nn.Module], bool]
    build: Callable[[nn.Module], nn.Module]


RULES: list[Rule] = []


def register(rule: Rule) -> Rule:
    RULES.append(rule)
    return rule


@dataclasses.dataclass
class PatchReport:
    swapped: list[tuple[str, str, str]]  # (qualified name, original class, replacement class)

    def __str__(self) -> str:
        lines = [f"mmfuse.patch: swapped {len(self.swapped)} module(s)"]
        lines += [f"  {name}: {old} -> {new}" for name, old, new in self.swapped]
        return "\n".join(lines)

    def __len__(self) -> int:
        return len(self.swapped)


def patch(model: nn.Module) -> PatchReport:
    """Replace recognised submodules of ``model`` in place (outermost match wins)."""
    swapped = []

    def visit(parent: nn.Module, prefix: str):
        for child_name, child in list(parent.named_children()):
            qual = f"{prefix}.{child_name}" if prefix else child_name
            rule = next((r for r in RULES if r.matches(child)), None)
            if rule is not None:
                new = rule.build(child)
                setattr(parent, child_name, new)
                swapped.append((qual, type(child).__name__, type(new).__name__))
            else:
                visit(child, qual)

    visit(model, "")
    return PatchReport(swapped)
