"""mlxctl: the command line client. Imports no heavy library unless it runs a model."""
