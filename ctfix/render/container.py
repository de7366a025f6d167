"""A container as JSON (`{"id", "name", "engine", "pod", "namespace"}` or null) and
as the words people use for it ("container web", "pod prod/api-7d9f (container api)").

Know before changing: the JSON keys are a contract shared by every output that names
a container (explain's listeners, clients and namespace; later scan and watch).
"""

from __future__ import annotations

from typing import Any

from ctfix.core.model import ContainerRef


def container_json(ref: ContainerRef | None) -> dict[str, Any] | None:
    if ref is None:
        return None
    return {
        "id": ref.id,
        "name": ref.name,
        "engine": ref.engine,
        "pod": ref.pod,
        "namespace": ref.namespace,
    }


def container_text(ref: ContainerRef) -> str:
    """`container web`, or the pod first where Kubernetes labels name one."""
    if ref.pod:
        where = f"{ref.namespace}/{ref.pod}" if ref.namespace else ref.pod
        return f"pod {where} (container {ref.name})"
    return f"container {ref.name}"
