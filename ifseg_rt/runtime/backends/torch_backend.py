"""PyTorch backend for GPU machines without TensorRT (and a CPU reference): the same weights
(``model.safetensors``) in :class:`SegOFA`, with per-shape caches of everything that does not depend on pixels.

* position tables (``encoder.layer_biases``, ``decoder.seg_biases``) and the prompt's text embedding are computed
  once per token grid and kept (a small LRU), in the compute dtype;
* fp16/bf16 on CUDA (LayerNorm, GELU and the attention softmax stay fp32 inside the model's modules), SDPA
  attention (the model's ``MultiheadAttention``), ``torch.inference_mode``;
* optional CUDA graphs: one capture per input shape, replayed with a copy into a static input buffer.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Dict, Optional, Tuple

import numpy as np

from . import BackendUnavailable

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
CACHE_SHAPES = 8  # token grids whose position tables are kept


class TorchBackend:
    """
    Arguments:
      spec (ModelSpec): verified model directory with ``model.safetensors``
      device (str): "cpu", "cuda" or "cuda:N"
      dtype (str or None): "fp32", "fp16" or "bf16"; default fp32 on CPU, bf16 on CUDA
      cuda_graphs (bool): capture and replay CUDA graphs per input shape (CUDA only)
      threads (int or None): torch intra-op threads on CPU
    """

    name = "torch"

    def __init__(self, spec, *, device: str = "cpu", dtype: Optional[str] = None, cuda_graphs: bool = False,
                 threads: Optional[int] = None):
        try:
            import torch
        except ImportError as e:
            raise BackendUnavailable("the torch backend needs torch (pip install 'ifseg_rt[train]')") from e
        from ...checkpoint import load_checkpoint

        if not spec.has_file("model.safetensors"):
            raise BackendUnavailable(f"{spec.root} has no model.safetensors (exported with --no-weights); "
                                     f"use the onnxruntime backend")
        self.torch = torch
        self.device = torch.device(device)
        self.on_gpu = self.device.type == "cuda"
        if self.on_gpu and not torch.cuda.is_available():
            raise BackendUnavailable("device='cuda' but torch sees no CUDA GPU")
        dtype = dtype or ("bf16" if self.on_gpu else "fp32")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
        self.dtype = getattr(torch, DTYPES[dtype])
        if threads and not self.on_gpu:
            torch.set_num_threads(int(threads))
        ck = load_checkpoint(spec.path("model.safetensors"), dtype=self.dtype, device=self.device)
        model = ck.model
        if ck.kind != "segofa" or not model.has_prompt:
            raise BackendUnavailable(f"{spec.path('model.safetensors')} holds no SegOFA with a prompt")
        if model.num_categories != spec.num_categories:
            raise ValueError(f"model.safetensors has M = {model.num_categories}, ifseg.json lists "
                             f"{spec.num_categories} categories")
        self.model = model.eval()
        self.spec = spec
        self.normalize_features = spec.features_normalized
        self.cuda_graphs = bool(cuda_graphs) and self.on_gpu
        self._tables: "OrderedDict[Tuple[int, int], tuple]" = OrderedDict()
        self._graphs: Dict[tuple, tuple] = {}
        with torch.inference_mode():
            self._text = model.encoder.embed_text(model.prompt_tokens[None])  # 1xLxd, pixel-independent

    # --- caches ----------------------------------------------------------------------------------------------
    def tables(self, h: int, w: int):
        """(encoder biases [1xHxSxS], decoder self biases [1xHxTxT], cross bias HxTxS) for an h x w grid."""
        key = (h, w)
        hit = self._tables.get(key)
        if hit is not None:
            self._tables.move_to_end(key)
            return hit
        m, dt = self.model, self.dtype
        with self.torch.inference_mode():
            enc_pos, enc_b = m.encoder.layer_biases(h, w, self._text.shape[1])
            dec_b, cross = m.decoder.seg_biases(h, w, enc_pos)
            hit = ([b[None].to(dt) for b in enc_b], [b[None].to(dt) for b in dec_b], cross.to(dt))
        self._tables[key] = hit
        if len(self._tables) > CACHE_SHAPES:
            self._tables.popitem(last=False)
        return hit

    # --- forward ---------------------------------------------------------------------------------------------
    def forward(self, x):
        """``Bx3xHxW`` tensor on the device (compute dtype) -> (logits BxNxM fp32, features BxNxC fp32)."""
        torch = self.torch
        from ...model.encoder import EncoderOutput

        m = self.model
        enc, dec = m.encoder, m.decoder
        feats, (h, w) = enc.image_features(x)
        enc_b, dec_b, cross = self.tables(h, w)
        B, n = x.shape[0], h * w
        u = enc.embed_patches(feats)
        y = torch.cat([u, self._text.to(u.dtype).expand(B, -1, -1)], dim=1)
        for layer, bias in zip(enc.layers, enc_b):
            y = layer(y, bias)
        enc_out = enc.layer_norm(y)
        bos = dec.embed_tokens.weight[0].to(enc_out.dtype).expand(B, 1, -1)
        z = dec.layernorm_embedding(torch.cat([bos, enc_out[:, :n]], dim=1))
        eo = EncoderOutput(enc_out=enc_out, padding_mask=None, enc_pos=None, grid=(h, w))
        z = dec._run_layers(z, eo, dec_b, cross)
        logits = dec.seg_projection(z[:, :n]).float()
        feats = feats.float()
        if self.normalize_features:
            feats = torch.nn.functional.normalize(feats, dim=-1)
        return logits, feats

    def run(self, x: np.ndarray):
        """``Bx3xHxW`` float32 numpy -> numpy outputs on CPU, torch tensors on CUDA."""
        torch = self.torch
        with torch.inference_mode():
            xt = torch.from_numpy(np.ascontiguousarray(x))
            xt = xt.to(self.device, non_blocking=True).to(self.dtype)
            if self.cuda_graphs:
                logits, feats = self._replay(xt)
            else:
                logits, feats = self.forward(xt)
        if self.on_gpu:
            return logits, feats
        return logits.numpy(), feats.numpy()

    def _replay(self, xt):  # unverified here: needs a CUDA GPU
        torch = self.torch
        key = tuple(xt.shape)
        g = self._graphs.get(key)
        if g is None:
            h, w = -(-key[2] // 16), -(-key[3] // 16)
            self.tables(h, w)  # tables must exist before capture (no allocation inside the graph)
            static_x = xt.clone()
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):  # warm-up: kernels selected, workspaces allocated
                    self.forward(static_x)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self.forward(static_x)
            g = self._graphs[key] = (graph, static_x, out)
        graph, static_x, out = g
        static_x.copy_(xt)
        graph.replay()
        return out[0].clone(), out[1].clone()
