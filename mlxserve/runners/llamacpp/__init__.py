"""The runners over llama.cpp (llama-cpp-python): completion with slots, embeddings, media.

Each module imports llama-cpp-python lazily, through ``library.py``.
"""
