"""Runners: the one ``ModelRunner`` protocol and its implementations (MLX, llama.cpp).

Runners know nothing of HTTP or the queue. Import a concrete runner lazily (``select.py``): they
pull in heavy libraries.
"""
