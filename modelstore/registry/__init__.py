"""Pull and push models through OCI distribution registries (see ``docs/REGISTRY.md``)."""

from modelstore.registry.pull import pull_model
from modelstore.registry.push import PushResult, push_model
from modelstore.registry.session import ProgressEvent

__all__ = ["ProgressEvent", "PushResult", "pull_model", "push_model"]
