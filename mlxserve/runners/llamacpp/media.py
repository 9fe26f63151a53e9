"""A GGUF vision model's projector (``mmproj``) through llama.cpp's libmtmd (llama-cpp-python's
``mtmd_cpp`` bindings), for the slot engine (``slots.py``).

libmtmd splits a prompt with media markers into text and image chunks (``mtmd_tokenize``) and
prefills them into one sequence id of the engine's context (``mtmd_helper_eval_chunks``: the
vision tower's embeddings are decoded like tokens); after that the sequence decodes like any
other. Images are decoded by ``mlxserve.images.open_image`` (size and format checks) and handed
over as RGB pixels (``mtmd_bitmap_init``), so llama.cpp's own image decoder never sees
untrusted bytes. Everything here runs on the engine thread.
"""

from __future__ import annotations

import ctypes
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlxserve.errors import InferenceError, UnsupportedFeatureError
from mlxserve.images import open_image

IMAGE_POSITION = -1
"""The token the slot records for each image position: never a real token, so a later prompt's
cached prefix stops at the first image (its KV holds embeddings, not tokens)."""


def text_prefix(tokens: list[int]) -> int:
    """How many of ``tokens`` come before the first image: what a prompt with images shares
    with a cached one at most (the chat core places each image where it sits, so this is the
    conversation's text before its first image)."""
    return tokens.index(IMAGE_POSITION) if IMAGE_POSITION in tokens else len(tokens)


class MediaProjector:
    """libmtmd's context for one text model and its projector."""

    def __init__(self, llama_cpp: Any, model: Any, path: Path, n_threads: int) -> None:
        from llama_cpp import _logger, mtmd_cpp

        # libmtmd logs every image it encodes; route it through llama-cpp-python's callback,
        # which the runner has set to errors only, as llama.cpp's own log already is.
        mtmd_cpp.mtmd_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
        mtmd_cpp.mtmd_helper_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
        self._mtmd = mtmd_cpp
        self._llama_cpp = llama_cpp
        params = mtmd_cpp.mtmd_context_params_default()
        params.n_threads = n_threads
        params.print_timings = False
        params.warmup = False
        # A marker of this load's own, not libmtmd's default ``<__media__>``: a message whose
        # text holds the default (a user quoting llama.cpp) keeps it as text instead of
        # unpairing the images; no one can type a marker they cannot know.
        marker = f"<__media_{secrets.token_hex(8)}__>".encode()
        params.media_marker = marker
        context = mtmd_cpp.mtmd_init_from_file(str(path).encode(), model, params)
        if not context:
            # libmtmd logs why (an unknown projector type, an output width other than the text
            # model's embedding width, ...) and returns NULL.
            raise InferenceError(
                f"llama.cpp could not load the projector {path.name} for this model "
                "(its log says why)"
            )
        self._context = context
        if mtmd_cpp.mtmd_decode_use_mrope(context):
            self.close()
            # The slot engine gives each token one position; M-RoPE needs 2-D image positions.
            raise UnsupportedFeatureError(
                "this projector uses M-RoPE image positions, which the llama.cpp runner "
                "does not decode yet"
            )
        self.marker = marker.decode()

    def close(self) -> None:
        if self._context:
            self._mtmd.mtmd_free(self._context)
            self._context = None

    def tokenize(
        self, prompt: str, add_special: bool, images: list[bytes]
    ) -> tuple[list[int], Any]:
        """The prompt's token list (``IMAGE_POSITION`` for each image position) and libmtmd's
        chunks to prefill; an image the prompt does not place goes in front of it."""
        mtmd = self._mtmd
        decoded = [open_image(data, index) for index, data in enumerate(images)]
        missing = len(images) - prompt.count(self.marker)
        prompt = self.marker * max(missing, 0) + prompt
        bitmaps = (mtmd.mtmd_bitmap_p_ctypes * max(len(decoded), 1))()
        try:
            for index, image in enumerate(decoded):
                pixels = image.convert("RGB").tobytes()
                buffer = (ctypes.c_uint8 * len(pixels)).from_buffer_copy(pixels)
                bitmaps[index] = mtmd.mtmd_bitmap_init(image.width, image.height, buffer)
                if not bitmaps[index]:
                    raise InferenceError(f"llama.cpp could not take image {index}")
            encoded = prompt.encode()
            text = mtmd.mtmd_input_text()
            text.text, text.text_len = encoded, len(encoded)
            text.add_special, text.parse_special = add_special, True
            chunks = mtmd.mtmd_input_chunks_init()
            status = mtmd.mtmd_tokenize(
                self._context, chunks, ctypes.byref(text), bitmaps, len(decoded)
            )
            if status != 0:
                mtmd.mtmd_input_chunks_free(chunks)
                # 1: the markers and images do not pair up; 2: an image failed to preprocess.
                raise InferenceError(f"llama.cpp could not tokenize the images (status {status})")
        finally:
            for index in range(len(decoded)):
                if bitmaps[index]:
                    mtmd.mtmd_bitmap_free(bitmaps[index])
        tokens: list[int] = []
        for index in range(mtmd.mtmd_input_chunks_size(chunks)):
            chunk = mtmd.mtmd_input_chunks_get(chunks, index)
            if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                count = ctypes.c_size_t(0)
                pointer = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(count))
                tokens.extend(pointer[i] for i in range(count.value))
            else:
                tokens.extend([IMAGE_POSITION] * mtmd.mtmd_input_chunk_get_n_tokens(chunk))
        return tokens, chunks

    def prefill(
        self,
        lctx: Any,
        chunks: Any,
        seq_id: int,
        n_batch: int,
        start: int,
        progress: Callable[[], None],
    ) -> int:
        """Decode the chunks into ``seq_id`` from position ``start``, logits for the last
        token; returns the next position. The text before ``start`` is already in the sequence
        (the slot engine prefills, or reuses, the text before the first image): its chunks
        are skipped. ``progress`` is called after each chunk. The chunks are freed."""
        mtmd = self._mtmd
        n_past = self._llama_cpp.llama_pos(start)
        try:
            count = mtmd.mtmd_input_chunks_size(chunks)
            position = 0
            for index in range(count):
                chunk = mtmd.mtmd_input_chunks_get(chunks, index)
                position += mtmd.mtmd_input_chunk_get_n_tokens(chunk)
                if position <= start:
                    continue
                status = mtmd.mtmd_helper_eval_chunk_single(
                    self._context,
                    lctx,
                    chunk,
                    n_past.value,
                    seq_id,
                    n_batch,
                    index == count - 1,
                    ctypes.byref(n_past),
                )
                if status != 0:
                    raise InferenceError(
                        f"llama.cpp could not prefill the images (status {status})"
                    )
                progress()
        finally:
            mtmd.mtmd_input_chunks_free(chunks)
        return int(n_past.value)

    def free(self, chunks: Any) -> None:
        self._mtmd.mtmd_input_chunks_free(chunks)
