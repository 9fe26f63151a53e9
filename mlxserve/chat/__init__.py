"""The chat core shared by every API: typed requests in (``types.py``), typed events out
(``core.py``), with the model family's formats (``family.py``), output parsing (``output.py``)
and tool offering (``tooling.py``)."""
