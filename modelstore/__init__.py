"""The content-addressed model store. Knows nothing of runners or HTTP."""
