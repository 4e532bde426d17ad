"""The SFT loss: next-token cross-entropy at the label positions only, optionally fused with the
output layer so that the full-vocabulary logits are never held at once.

    Trainer(..., compute_loss_func=label_only_loss)                 # logits in, loss out
    loss = OutputLayerLoss(model); RunTrainer(..., compute_loss_func=loss)   # as train.build_trainer does

With assistant-only labels and `logits_to_keep` (train/packing.py) the output layer already runs only
where a label is predicted, but those logits are still a [labels x vocabulary] float tensor: about
1,000 x 49,152 for a packed SmolLM2 batch, 200 MB in float32, with as much again for its softmax and
its gradient, each written and read by a separate pass over memory. `OutputLayerLoss` takes the
hidden states the output layer would have multiplied, and computes the loss and its gradient chunk
by chunk (64 MB of logits at a time, in buffers reused by every chunk): the same products in the
same precision, without the big tensors.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING

import torch

from mathtune.data.tokenize import IGNORE_INDEX

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# Rows of logits per chunk: 64 MB of float32 logits (SmolLM2's 49k vocabulary: 341 rows). Measured on the
# loss of 1,050 SmolLM2 labels (Intel Xeon with AMX): bf16 243 ms at 64 MB, 217 at 16 MB, 339 at 4 MB;
# float32 429 ms at 64 MB, 688 at 16 MB, 2,026 at 4 MB (its products slow down on fewer rows).
CHUNK_BYTES = 64 * 2**20


def label_only_loss(outputs, labels, num_items_in_batch=None):
    """Trainer's `compute_loss_func`: next-token cross-entropy summed over the label tokens, divided
    by the label tokens of the whole accumulated batch (`num_items_in_batch`, which Trainer counts
    across steps and processes) or, without it, of this batch.

    The logits are either one per label (a packed row whose collator chose `logits_to_keep`) or one
    per position (any other batch), where they are shifted as in transformers' causal-LM loss."""
    logits = outputs.logits
    targets = labels[:, 1:]
    if logits.shape[1] != labels.shape[1]:  # already only the positions that predict a label
        targets = targets[targets != IGNORE_INDEX].unsqueeze(0)
    else:
        logits = logits[:, :-1]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                                             ignore_index=IGNORE_INDEX, reduction="sum")
    return loss / _count(targets, num_items_in_batch)


def _count(targets: torch.Tensor, num_items_in_batch):
    return num_items_in_batch if num_items_in_batch is not None else (targets != IGNORE_INDEX).sum().clamp(min=1)


def fusable_output_layer(model: PreTrainedModel) -> torch.nn.Linear | None:
    """The model's output layer where the fused loss computes what the model would: a plain frozen
    linear layer without bias, whose logits the model uses as they come (no soft-capping or scaling,
    which gemma2/3, cohere and granite apply after it)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    config = base.config
    rescaled = any(getattr(config, key, None) not in (None, 1, 1.0)
                   for key in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale"))
    if type(head) is not torch.nn.Linear or head.bias is not None or head.weight.requires_grad or rescaled:
        return None
    return head


class OutputLayerLoss:
    """`label_only_loss` with the output layer folded in (see the module's docstring).

    A forward pre-hook on the output layer takes its input (the hidden states at the label
    positions) and hands the layer an empty slice instead, but only while `capturing()` is open:
    RunTrainer opens it around each loss computation, so every other use of the model (generation,
    evaluation after training, a direct call) runs the output layer as usual."""

    def __init__(self, head: torch.nn.Linear):
        self.head = head
        self._capturing = False
        self._hidden: torch.Tensor | None = None
        self._dtype: torch.dtype | None = None
        head.register_forward_pre_hook(self._take_input)

    @contextmanager
    def capturing(self):
        self._capturing, self._hidden = True, None
        try:
            yield
        finally:
            self._capturing, self._hidden = False, None

    def _take_input(self, module, args):
        if not self._capturing:
            return None
        hidden = args[0]
        device = hidden.device.type
        # The precision the output layer would have run in: autocast's (bf16 training) or its own.
        self._dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        self._hidden = hidden
        return (hidden[..., :0, :],)

    def __call__(self, outputs, labels, num_items_in_batch=None):
        hidden, self._hidden = self._hidden, None
        if hidden is None:  # the output layer ran as usual: the logits are in the outputs
            return label_only_loss(outputs, labels, num_items_in_batch)
        targets = labels[:, 1:]
        if hidden.shape[1] != labels.shape[1]:  # one row per label (logits_to_keep)
            targets = targets[targets != IGNORE_INDEX]
        else:
            hidden, targets = hidden[:, :-1], targets.reshape(-1)
        hidden = hidden.reshape(-1, hidden.shape[-1])
        keep = targets != IGNORE_INDEX
        if not bool(keep.all()):
            hidden, targets = hidden[keep], targets[keep]
        count = _count(targets, num_items_in_batch)
        return _LinearCrossEntropy.apply(hidden, self.head.weight, targets, count, self._dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    """sum over rows of cross_entropy(hidden @ weight.T, targets) / count, and d/d hidden, computed
    in chunks during the forward pass (the weight is frozen: it gets no gradient)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, count, dtype):
        rows = max(16, CHUNK_BYTES // (4 * weight.shape[0]))
        w = weight.to(dtype)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if hidden.requires_grad else None
        # Buffers reused by every chunk, each pass in place: a fresh [rows x vocabulary] tensor per
        # operation (logsumexp's temporaries, a softmax, its cast) cost more in page faults and memory
        # passes than the two products (SmolLM2, 1,050 labels: bf16 299 ms with them, 243 ms without;
        # float32 478 and 429 ms). In float32 the products are the logits: one buffer.
        products = torch.empty(rows, weight.shape[0], dtype=dtype, device=hidden.device)
        logits = products if dtype == torch.float32 else torch.empty_like(products, dtype=torch.float32)
        for start in range(0, hidden.shape[0], rows):
            chunk, target = hidden[start : start + rows].to(dtype), targets[start : start + rows]
            n = len(target)
            product, row = products[:n], logits[:n]
            torch.mm(chunk, w.T, out=product)
            if row is not product:
                row.copy_(product)  # as the output layer, then `.float()` in label_only_loss
            top = row.amax(dim=-1, keepdim=True)
            picked = row.gather(1, target[:, None])
            row.sub_(top).exp_()  # exp(logit - max): softmax before its sum
            sums = row.sum(dim=-1, keepdim=True)
            total += (top + sums.log() - picked).sum()
            if grad is not None:
                # d loss / d logits = softmax - one_hot(target), divided by count, back through the layer:
                # (exp(logits - max) @ w) / sum - w[target]. The rows go through the product as they are
                # and are divided by their sums afterwards, on [rows x hidden] in float32, where the
                # target's weight row is subtracted too. Scaling the [rows x vocabulary] rows into the
                # product's dtype instead (a float32 x float32 -> bf16 `mul(out=)`, a slow mixed-dtype
                # pass) made the loss of 1,061 SmolLM2 labels 465-490 ms against 412-450 in bf16 on an
                # AMD EPYC Zen 4; the gradient is as close to float64's (relative error 0.00166).
                if row is not product:
                    product.copy_(row)
                share = (product @ w).float().div_(sums).sub_(w[target]).div_(count)
                grad[start : start + rows] = share
        ctx.save_for_backward(grad)
        return total / count

    @staticmethod
    def backward(ctx, upstream):
        (grad,) = ctx.saved_tensors
        # Trainer's upstream gradient is 1 (the loss is already divided by the label count).
        return (grad if bool(upstream == 1) else grad * upstream.to(grad.dtype)), None, None, None, None


class OutputLayerLossMixin:
    """For a Trainer subclass: opens `OutputLayerLoss.capturing()` around each loss computation."""

    def compute_loss(self, model, inputs, *args, **kwargs):
        loss = self.compute_loss_func
        with loss.capturing() if isinstance(loss, OutputLayerLoss) else nullcontext():
            return super().compute_loss(model, inputs, *args, **kwargs)
