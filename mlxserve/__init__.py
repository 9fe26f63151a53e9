"""mlxserve: the daemon and the inference core (runners, prompts, scheduling)."""

__version__ = "0.1.0"
