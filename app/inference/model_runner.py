"""The forward passes of the engine: a Llama-family decoder run over a slot-based KV cache.

Three modules share the work: this one computes (prefill and decode forward passes, the weight
layout); kv_cache.py owns the cache's memory and its slots (reserve, add, keep, release);
cuda_graphs.py captures and replays decode steps on CUDA.

transformers' own forward pass is built for one static batch: every decode step it rebuilds masks
and position tensors, and its cache grows by concatenation, so a continuously changing batch
costs row surgery on every layer. The runner keeps the model's own modules and weights (loaded by
transformers, so every checkpoint format and RoPE variant it knows still works) and runs them in
a fixed layout instead:

- one key and one value tensor for all layers (kv_cache.KVCache); row ``r`` of the running
  batch lives in slot ``r``, so a decode step reads a plain view of the first ``batch`` slots,
  with one mask for rows of different lengths;
- prompts are prefilled into a separate staging tensor (kv_cache.StagedKV: no slot is touched
  until the sequence joins the batch), one chunk at a time for long prompts, several short
  prompts in one pass;
- the query, key and value projections, and the gate and up projections, are fused into one
  matrix product each (the module weights become views of the fused matrix, so the model keeps
  working for `generate` and uses no extra memory);
- on CUDA, each decode step is replayed from a CUDA graph captured per (batch bucket, attention
  window; cuda_graphs.DecodeGraphs), which removes the kernel-launch overhead that dominates
  small models on a GPU (optionally with torch.compile inside, `compile_decode`);
- on CUDA the step is also built from fewer kernels (`fused_kernels`): a decode step of a small
  model is a chain of a few hundred tiny kernels whose count, not the bytes they read, sets its
  time. One kernel per norm, the residual additions inside the matrix products, the rotary
  embedding of a decode step as one batched product with per-row rotation matrices (compiled:
  elementwise, fused with the cache write), the attention mask built once per step instead of
  converted by every layer. These change the order of floating-point roundings, so the CPU keeps
  transformers' exact operations;
- on the CPU in fp32, the matrix products run through numpy's OpenBLAS on transposed weights
  (see _Projection: about twice MKL's speed for a few rows on AMD processors); the modules keep
  transposed views of them, so the weights are still held once.

The attention calls mirror transformers' SDPA integration (GQA packing for single-token queries,
`enable_gqa` without a mask), so greedy fp32 outputs match `model.generate` token for token.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as functional

from app.inference.cuda_graphs import DecodeGraphs
from app.inference.kv_cache import KVCache, StagedKV
from app.inference.transfer import to_device
from app.inference.types import ModelLoadError

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# Up to this many rows, OpenBLAS multiplies row by row (see _Projection).
_MATRIX_VECTOR_ROWS = 3


def check_supported(model: Any) -> None:
    """Raise ModelLoadError with one line when the runner cannot run this model."""
    config = model.config
    model_type = getattr(config, "model_type", "?")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(
            f"model type {model_type!r} is not supported: the engine runs decoder models of type "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        layer_types = getattr(config, "layer_types", None) or []
        if model_type == "mistral" or any(kind != "full_attention" for kind in layer_types):
            raise ModelLoadError(
                f"model {model_type} uses sliding-window attention (sliding_window="
                f"{config.sliding_window}); the engine supports full attention only"
            )
    try:
        layer = model.model.layers[0]
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            getattr(layer.self_attn, name).weight  # noqa: B018 - presence check
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(layer.mlp, name).weight  # noqa: B018
        model.model.rotary_emb  # noqa: B018
    except AttributeError as error:
        raise ModelLoadError(f"model {model_type} does not have the Llama decoder layout: {error}") from error


class _Projection:
    """One matrix product of the runner, over one Linear or several of the same input (fused).

    Several projections of one input (query/key/value, gate/up) become one product over their
    concatenated weights; the modules keep views of the runner's weight, so the model still works
    (`generate`, the tests' reference) and the weights are held once.

    On the CPU in fp32 the product runs through numpy's OpenBLAS: torch's CPU build multiplies
    through MKL, whose small-batch fp32 kernels run several times below the memory bandwidth on
    AMD processors (a batch-8 decode step spent 70% of its time there), while OpenBLAS picks
    kernels for the processor it finds. OpenBLAS wants the weight transposed ([in, out],
    contiguous); the modules then hold transposed views of it, which torch multiplies by at least
    as fast as by the original layout (docs/performance.md).
    """

    def __init__(self, linears: list[Any], use_openblas: bool) -> None:
        weights = [linear.weight.data for linear in linears]
        weight = torch.cat(weights) if len(weights) > 1 else weights[0]
        bias = None
        if any(linear.bias is not None for linear in linears):
            bias = torch.cat(
                [
                    linear.bias.data if linear.bias is not None else weight.new_zeros(linear.weight.shape[0])
                    for linear in linears
                ]
            )
        self.transposed = None
        if use_openblas:
            transposed = weight.t().contiguous()
            self.transposed = transposed.numpy()
            weight = transposed.t()
        start = 0
        for linear in linears:
            rows = linear.weight.shape[0]
            linear.weight.data = weight[start : start + rows]
            if linear.bias is not None and bias is not None:
                linear.bias.data = bias[start : start + rows]
            start += rows
        self.weight = weight
        self.bias = bias

    def add_into(self, hidden: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """hidden += inputs @ weight.T (+ bias), in place: one product whose output adds to `hidden`."""
        if self.transposed is not None or self.bias is not None:
            hidden += self(inputs)
            return hidden
        hidden.view(-1, hidden.shape[-1]).addmm_(inputs.reshape(-1, inputs.shape[-1]), self.weight.t())
        return hidden

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.transposed is None:
            return functional.linear(hidden, self.weight, self.bias)
        rows = hidden.reshape(-1, hidden.shape[-1]).numpy()
        if 1 < rows.shape[0] <= _MATRIX_VECTOR_ROWS:
            # A matrix product of two or three rows costs OpenBLAS about as much as one of eight;
            # one matrix-vector product per row costs a third to a half of it.
            product = np.empty((rows.shape[0], self.transposed.shape[1]), dtype=rows.dtype)
            for index, row in enumerate(rows):
                np.matmul(row, self.transposed, out=product[index])
        else:
            product = rows @ self.transposed
        output = torch.from_numpy(product)
        if self.bias is not None:
            output += self.bias
        return output.view(*hidden.shape[:-1], output.shape[-1])


class _Layer:
    def __init__(self, module: Any, use_openblas: bool) -> None:
        attention = module.self_attn
        self.input_norm = module.input_layernorm
        self.post_attention_norm = module.post_attention_layernorm
        self.q_norm = getattr(attention, "q_norm", None)
        self.k_norm = getattr(attention, "k_norm", None)
        self.qkv = _Projection([attention.q_proj, attention.k_proj, attention.v_proj], use_openblas)
        self.o_proj = _Projection([attention.o_proj], use_openblas)
        self.gate_up = _Projection([module.mlp.gate_proj, module.mlp.up_proj], use_openblas)
        self.down_proj = _Projection([module.mlp.down_proj], use_openblas)
        self.act_fn = module.mlp.act_fn
        self.intermediate = module.mlp.gate_proj.weight.shape[0]
        self.scaling = attention.scaling


class ModelRunner:
    """Runs one loaded model over the running batch's KV cache (`cache`, at most `max_slots` rows).

    device: where the model's weights are. use_cuda_graphs (None: on CUDA) replays decode steps
    from CUDA graphs; compile_decode runs the decode step through torch.compile; fused_kernels
    (None: on CUDA) trades bit-exactness with transformers for fewer kernels. Raises
    ModelLoadError for a model it cannot run (check_supported).
    """

    def __init__(
        self,
        model: Any,
        device: torch.device,
        max_slots: int,
        use_cuda_graphs: bool | None = None,
        compile_decode: bool = False,
        fused_kernels: bool | None = None,
    ) -> None:
        check_supported(model)
        config = model.config
        self.model = model
        self.device = device
        self.max_slots = max_slots
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.groups = self.heads // self.kv_heads
        self.context_length = int(getattr(config, "max_position_embeddings", 0) or 1 << 20)
        self._embed = model.model.embed_tokens
        self._rotary = model.model.rotary_emb
        self._final_norm = model.model.norm
        parameter = next(model.parameters())
        self.dtype = parameter.dtype
        # Fewer kernels, not bit-exact with transformers (see the module docstring). None: on CUDA.
        self.fused_kernels = device.type == "cuda" if fused_kernels is None else fused_kernels
        self.uses_openblas = device.type == "cpu" and self.dtype == torch.float32 and not self.fused_kernels
        lm_head = model.get_output_embeddings()
        self._lm_head = _Projection([lm_head], self.uses_openblas)
        self._layers = [_Layer(module, self.uses_openblas) for module in model.model.layers]
        self._layer_indices = [torch.tensor([index], device=device) for index in range(len(self._layers))]
        self._q_size = self.heads * self.head_dim
        self._kv_size = self.kv_heads * self.head_dim
        if use_cuda_graphs is None:
            use_cuda_graphs = device.type == "cuda"
        self.use_cuda_graphs = use_cuda_graphs and device.type == "cuda"
        self.cache = KVCache(
            layers=len(self._layers),
            max_slots=max_slots,
            kv_heads=self.kv_heads,
            head_dim=self.head_dim,
            max_positions=self.context_length,
            device=device,
            dtype=self.dtype,
            # Captured graphs point at the cache's tensors: a GPU keeps them while idle.
            keep_storage=self.use_cuda_graphs,
        )
        self._rotate_jointly = self._layers[0].q_norm is None
        self._compiled_decode: Any = None
        smallest_bucket = 1
        if compile_decode:
            # Sizes of 1 are specialised by the compiler: a batch of one runs in the bucket of two
            # (the same weights are read) rather than paying for a second compilation.
            smallest_bucket = min(2, max_slots)
            # Fuses the elementwise work of each layer into a few kernels (inductor). The second
            # batch or window size seen makes those dimensions symbolic: two compilations in all.
            self._compiled_decode = torch.compile(self._decode_forward)
        self.graphs: DecodeGraphs | None = None
        if self.use_cuda_graphs:
            self.graphs = DecodeGraphs(self.cache, self._decode_step, smallest_bucket)

    def _decode_step(
        self, tokens: torch.Tensor, positions: torch.Tensor, window: int, masked: bool
    ) -> torch.Tensor:
        if self._compiled_decode is not None:
            try:
                return self._compiled_decode(tokens, positions, window, masked)
            except Exception:
                logger.exception("torch.compile of the decode step failed; running it uncompiled from now on")
                self._compiled_decode = None
        return self._decode_forward(tokens, positions, window, masked)

    # ----- forward passes -----------------------------------------------------------------------

    def _rotation(self, hidden: torch.Tensor, positions: torch.Tensor) -> _Rotation:
        """The rotary embedding at `positions` [batch, tokens] (hidden: only its dtype and device)."""
        cos, sin = self._rotary(hidden, positions)
        matrices = None
        # A decode step rotates by one matrix per row with fused kernels; compiled, the elementwise
        # rotation fuses with the cache write into one kernel instead, which is fewer still.
        if self.fused_kernels and self._compiled_decode is None and positions.shape[1] == 1:
            matrices = _rotation_matrices(cos[:, 0], sin[:, 0])
        # cos/sin: [batch, tokens, head_dim], broadcast over the heads.
        return _Rotation(cos.unsqueeze(2), sin.unsqueeze(2), matrices)

    def _project_qkv(
        self, layer: _Layer, hidden: torch.Tensor, rotation: _Rotation
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[batch, tokens, hidden] -> query [b, heads, t, d], key and value [b, kv_heads, t, d], rotated."""
        batch, tokens, _ = hidden.shape
        normed = self._norm(layer.input_norm, hidden)
        qkv = layer.qkv(normed)
        value = qkv[..., self._q_size + self._kv_size :]
        value = value.view(batch, tokens, self.kv_heads, self.head_dim).transpose(1, 2)
        if self._rotate_jointly:
            # Queries and keys are rotated in one pass (the same operations on every head).
            query_key = qkv[..., : self._q_size + self._kv_size]
            query_key = query_key.view(batch, tokens, self.heads + self.kv_heads, self.head_dim)
            query_key = rotation.apply(query_key)
            query, key = query_key.split([self.heads, self.kv_heads], dim=2)
        else:
            query = qkv[..., : self._q_size].view(batch, tokens, self.heads, self.head_dim)
            key = qkv[..., self._q_size : self._q_size + self._kv_size]
            key = key.view(batch, tokens, self.kv_heads, self.head_dim)
            assert layer.q_norm is not None and layer.k_norm is not None
            query = rotation.apply(self._norm(layer.q_norm, query))
            key = rotation.apply(self._norm(layer.k_norm, key))
        return query.transpose(1, 2), key.transpose(1, 2), value

    def _norm(self, module: Any, hidden: torch.Tensor) -> torch.Tensor:
        epsilon = getattr(module, "variance_epsilon", None)
        if self.fused_kernels and epsilon is not None:
            return functional.rms_norm(hidden, module.weight.shape, module.weight, epsilon)
        return module(hidden)

    def _add_projection(
        self, hidden: torch.Tensor, projection: _Projection, inputs: torch.Tensor
    ) -> torch.Tensor:
        """hidden + projection(inputs); with fused kernels the addition happens inside the product."""
        if self.fused_kernels:
            return projection.add_into(hidden, inputs)
        return hidden + projection(inputs)

    def _finish_layer(self, layer: _Layer, hidden: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """attention: [batch, tokens, heads * head_dim]; returns the layer's output hidden states.

        `hidden` is the layer's own input: with fused kernels it is updated in place.
        """
        hidden = self._add_projection(hidden, layer.o_proj, attention)
        normed = self._norm(layer.post_attention_norm, hidden)
        gate_up = layer.gate_up(normed)
        gate, up = gate_up.split([layer.intermediate, layer.intermediate], dim=-1)
        return self._add_projection(hidden, layer.down_proj, layer.act_fn(gate) * up)

    def prefill(
        self, token_ids: list[list[int]], past: StagedKV | None = None
    ) -> tuple[torch.Tensor, StagedKV]:
        """Run prompts (right-padded to one width) from position 0, or one prompt's next chunk after `past`.

        Returns the logits at each row's last real token, [rows, vocab], and the staged keys/values.
        """
        rows = len(token_ids)
        width = max(len(ids) for ids in token_ids)
        start = 0 if past is None else past.length
        if past is not None and rows != 1:
            raise ValueError("a prompt is continued in chunks one at a time")
        ids = torch.tensor([ids + [ids[-1]] * (width - len(ids)) for ids in token_ids], device=self.device)
        positions = torch.arange(start, start + width, device=self.device).unsqueeze(0).expand(rows, -1)
        hidden = self._embed(ids)
        rotation = self._rotation(hidden, positions)
        mask = None
        if past is not None:
            # Query i (at position start + i) sees the past and the chunk up to itself.
            columns = torch.arange(start + width, device=self.device)
            mask = (columns.unsqueeze(0) <= (positions[0].unsqueeze(1))).view(1, 1, width, start + width)
        new_keys, new_values = [], []
        for index, layer in enumerate(self._layers):
            query, key, value = self._project_qkv(layer, hidden, rotation)
            if past is not None:
                key = torch.cat([past.keys[index], key], dim=2)
                value = torch.cat([past.values[index], value], dim=2)
            # The keys and values this layer attends to are what the prompt has staged so far.
            new_keys.append(key)
            new_values.append(value)
            if mask is None:
                # Right padding comes after every real token: a causal mask keeps rows exact.
                attention = functional.scaled_dot_product_attention(
                    query, key, value, is_causal=width > 1, scale=layer.scaling, enable_gqa=self.groups > 1
                )
            else:
                attention = functional.scaled_dot_product_attention(
                    query,
                    _repeat_kv(key, self.groups),
                    _repeat_kv(value, self.groups),
                    attn_mask=mask,
                    scale=layer.scaling,
                )
            attention = attention.transpose(1, 2).reshape(rows, width, self._q_size)
            hidden = self._finish_layer(layer, hidden, attention)
        last = torch.tensor([len(ids) - 1 for ids in token_ids], device=self.device)
        hidden = hidden[torch.arange(rows, device=self.device), last].unsqueeze(1)
        logits = self._lm_head(self._norm(self._final_norm, hidden))[:, -1, :]
        return logits, StagedKV(torch.stack(new_keys), torch.stack(new_values))

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """One decode step of the running batch (row r = slot r); returns logits [rows, vocab].

        tokens: [rows] on the device, each row's latest token. They may still be in the making
        (the previous step's choice, queued on the device): nothing here waits for them. The
        cache's lengths advance by one only when the step succeeds, so a failed step can be run
        again. Raises ValueError when `tokens` does not match the running rows, and whatever the
        device raises (torch.OutOfMemoryError, a CUDA error).
        """
        rows = tokens.shape[0]
        lengths = self.cache.lengths
        if rows != len(lengths):
            raise ValueError(f"{rows} tokens for {len(lengths)} running rows")
        window = max(lengths) + 1
        self.cache.reserve(window)
        if self.graphs is not None and self.graphs.fits(rows):
            logits = self.graphs.replay(tokens)
        else:
            positions = to_device(lengths, self.device)
            uniform = all(length == lengths[0] for length in lengths)
            logits = self._decode_step(tokens, positions, window, masked=not uniform)
        self.cache.advance()
        return logits

    def decode_rows(self, tokens: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """The decode step of some running rows alone, to find which rows a failing step fails for.

        tokens: [len(rows)] on the device, those rows' latest tokens; rows: running row indices
        (= cache slots). Returns logits [len(rows), vocab]. Eager (no CUDA graph, not compiled),
        and the cache's lengths do not advance: each row's key and value at its current length
        are written again, identically, by the next full step, and nothing reads them before.
        Raises whatever the forward pass raises.
        """
        lengths = [self.cache.lengths[row] for row in rows]
        window = max(lengths) + 1
        self.cache.reserve(window)
        positions = to_device(lengths, self.device)
        slots = to_device(rows, self.device)
        return self._decode_forward(tokens, positions, window, masked=True, slots=slots)

    def _decode_forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        window: int,
        masked: bool,
        slots: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens, positions: [rows]; attention over the first `window` positions of each slot.

        slots: [rows], the cache slot of each row; None: the first `rows` slots (the running
        batch, read as a view of the cache instead of gathered).
        """
        rows = tokens.shape[0]
        hidden = self._embed(tokens).unsqueeze(1)
        rotation = self._rotation(hidden, positions.unsqueeze(1))
        gathered = slots is not None
        if slots is None:
            slots = torch.arange(rows, device=self.device)
        mask = None
        if masked:
            # Additive, in the model's dtype: attention would otherwise convert a boolean mask in
            # every layer (the same values: -inf where a row has no token yet, 0 elsewhere).
            columns = torch.arange(window, device=self.device)
            unwritten = (columns.unsqueeze(0) > positions.unsqueeze(1)).view(rows, 1, 1, window)
            mask = torch.zeros(unwritten.shape, device=self.device, dtype=self.dtype)
            mask.masked_fill_(unwritten, float("-inf"))
        for index, layer in enumerate(self._layers):
            query, key, value = self._project_qkv(layer, hidden, rotation)
            # Indexed by tensors only: torch.compile then writes the cache in place, keys and values
            # in one kernel (an integer index made a view of the cache, and the compiled step copied
            # each layer's whole cache and wrote it back every step).
            at = (self._layer_indices[index], slots, slice(None), positions)
            self.cache.keys[at] = key.squeeze(2)
            self.cache.values[at] = value.squeeze(2)
            if gathered:
                keys = self.cache.keys[index, slots, :, :window]
                values = self.cache.values[index, slots, :, :window]
            else:
                keys = self.cache.keys[index, :rows, :, :window]
                values = self.cache.values[index, :rows, :, :window]
            if mask is None:
                attention = functional.scaled_dot_product_attention(
                    query, keys, values, scale=layer.scaling, enable_gqa=self.groups > 1
                )
            else:
                # As transformers does for one query token: the query heads of a key/value head
                # become that head's query rows, so no key/value is repeated.
                packed = query.reshape(rows, self.kv_heads, self.groups, self.head_dim)
                attention = functional.scaled_dot_product_attention(
                    packed, keys, values, attn_mask=mask, scale=layer.scaling
                )
            hidden = self._finish_layer(layer, hidden, attention.reshape(rows, 1, self._q_size))
        return self._lm_head(self._norm(self._final_norm, hidden))[:, -1, :]


@dataclass
class _Rotation:
    """The rotary embedding of one forward pass: cos/sin [batch, tokens, 1, head_dim], and for a
    decode step with fused kernels the same rotation as one matrix per row [batch, head_dim, head_dim]."""

    cos: torch.Tensor
    sin: torch.Tensor
    matrices: torch.Tensor | None

    def apply(self, states: torch.Tensor) -> torch.Tensor:
        """states: [batch, tokens, heads, head_dim]."""
        if self.matrices is None:
            return states * self.cos + _rotate_half(states) * self.sin
        batch, _, heads, dim = states.shape
        # One batched product instead of five elementwise kernels per layer.
        return torch.bmm(states.view(batch, heads, dim), self.matrices).view(batch, 1, heads, dim)


def _rotation_matrices(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """cos, sin: [batch, head_dim] -> R [batch, head_dim, head_dim] with x @ R = x*cos + rotate_half(x)*sin.

    rotate_half(x)[i] is -x[i + half] for i < half and x[i - half] above: so R[i, i] = cos[i],
    R[i + half, i] = -sin[i] and R[i - half, i] = sin[i], a diagonal rolled by half a row.
    """
    half = cos.shape[-1] // 2
    signed_sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
    return torch.diag_embed(cos) + torch.diag_embed(signed_sin).roll(half, dims=-2)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _repeat_kv(states: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return states
    batch, heads, length, dim = states.shape
    return (
        states[:, :, None]
        .expand(batch, heads, groups, length, dim)
        .reshape(batch, heads * groups, length, dim)
    )
