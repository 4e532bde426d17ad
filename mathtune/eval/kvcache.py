"""A KV cache for answering in pieces: transformers' DynamicCache with room to append in place.

    cache = appending_cache(model, room=16)
    out = model.generate(..., cache=cache, max_new_tokens=16, return_dict_in_generate=True)

DynamicCache appends each new token with `torch.cat`, which copies every layer's whole cache at
every decoding step: a tenth of the CPU time of the default run's answers. Here each full-attention
layer keeps its keys and values in a buffer with `room` free positions after them; an appended
token is written into the buffer, and the layer's keys and values are views of its filled part.
The buffer is reallocated (one copy) only when it is full, or after `batch_select_indices` has
cut the batch down (which copies anyway). Attention reads the same numbers either way, so the
answers are the ones DynamicCache gives, token for token (tests/eval/test_kvcache.py).

Layers of another kind (sliding-window, indexed) are transformers' own.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class AppendingLayer(DynamicLayer):
    """A DynamicLayer whose keys and values are views of a buffer with `room` positions to spare."""

    def __init__(self, room: int, **kwargs):
        super().__init__(**kwargs)
        self.room = room
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length, added = self.get_seq_length(), key_states.shape[-2]
        if not self._holds_views() or length + added > self._buffers[0].shape[-2]:
            self._buffers = (self._buffer(self.keys, key_states, length + added),
                             self._buffer(self.values, value_states, length + added))
        keys, values = self._buffers
        keys[..., length : length + added, :] = key_states
        values[..., length : length + added, :] = value_states
        self.keys, self.values = keys[..., : length + added, :], values[..., : length + added, :]
        return self.keys, self.values

    def _holds_views(self) -> bool:
        """The layer's keys are still a view of its buffer (reset, crop or batch_select_indices replace them)."""
        return (self._buffers is not None and self.keys.numel() > 0
                and self.keys.untyped_storage().data_ptr() == self._buffers[0].untyped_storage().data_ptr()
                and self.keys.shape[0] == self._buffers[0].shape[0])

    def _buffer(self, cached: torch.Tensor, new: torch.Tensor, length: int) -> torch.Tensor:
        """A buffer for `length` + room positions, holding what is cached so far."""
        buffer = new.new_empty((*new.shape[:-2], length + self.room, new.shape[-1]))
        if cached.numel():
            buffer[..., : cached.shape[-2], :] = cached
        return buffer


def appending_cache(model, room: int) -> DynamicCache:
    """The model's DynamicCache (its layer kinds from its config) with each full-attention layer
    an AppendingLayer with `room` positions to spare."""
    cache = DynamicCache(config=model.config)
    cache.layers = [AppendingLayer(room) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache
