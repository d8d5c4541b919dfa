"""Hidden states and pre-softmax attention scores of Hugging Face ``transformers`` BERT and
MobileBERT models, by module path, with forward hooks only (no model edits, no patching).

What is captured, per encoder layer ℓ of ``<base>.encoder.layer`` (``base`` = ``bert`` or
``mobilebert``, or the model itself for a bare ``BertModel`` / ``MobileBertModel``):

- the hidden state: the output of ``layer.ℓ.output`` (``BertOutput`` / ``MobileBertOutput``), which
  is the layer's output in every ``transformers`` version (the layer module itself returned a
  tuple before 5.x);
- the pre-softmax attention scores, **computed from the hooked query and key projections**
  (``layer.ℓ.attention.self.query`` / ``.key``): ``QKᵀ/√d + (1 − mask)·(−10⁴)``, per head, with the
  mask adder of the official MobileBERT code (``modeling.py``). ``transformers`` computes the scores
  inside a function (``eager_attention_forward`` or SDPA), so no module outputs them; the result is
  the same for every ``attn_implementation``. ``softmax`` of it equals the model's own attention
  probabilities (``output_attentions=True`` with ``attn_implementation="eager"``), which the tests
  check. The mask is read from the ``attention_mask`` argument of the model's forward (a hook on
  the model with its keyword arguments); no mask means no adder. Only absolute position
  embeddings are supported (relative ones add a term to the scores).

Also available: the embedding output (hidden state 0) and, for the pre-training models, the MLM
logits (``cls.predictions``) and the NSP logits (``cls.seq_relationship``).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from kdkernels.distill.capture import FeatureCapture, unwrap

MASK_ADDER = -10000.0  # modeling.py: adder = (1 - mask) * -10000


def _encoder_prefix(model: nn.Module) -> str:
    for base in ("bert", "mobilebert", ""):
        prefix = f"{base}.encoder.layer" if base else "encoder.layer"
        try:
            layers = model.get_submodule(prefix)
        except AttributeError:
            continue
        if isinstance(layers, nn.ModuleList):
            return prefix
    raise ValueError(
        f"BertFeatures: {type(model).__name__} has no encoder layers at bert.encoder.layer, mobilebert.encoder.layer or "
        "encoder.layer; give encoder_path="
    )


class BertFeatures:
    """Captures a BERT / MobileBERT model's per-layer hidden states and attention scores while
    used as a context manager::

        features = BertFeatures(model)
        with features:
            model(input_ids=ids, attention_mask=mask)
        hidden = features.hidden_states()        # L × (B, S, H)
        scores = features.attention_scores()     # L × (B, heads, S, S), pre-softmax

    Args:
        model: a ``transformers`` BERT or MobileBERT model (possibly DDP / compile wrapped).
        encoder_path: the ``nn.ModuleList`` of encoder layers (default: found).
    """

    def __init__(self, model: nn.Module, *, encoder_path: str | None = None) -> None:
        inner = unwrap(model)
        prefix = encoder_path if encoder_path is not None else _encoder_prefix(inner)
        layers = inner.get_submodule(prefix)
        config = getattr(inner, "config", None)
        if getattr(config, "position_embedding_type", "absolute") != "absolute":
            raise ValueError(
                f"BertFeatures: position_embedding_type={config.position_embedding_type!r}: only absolute position embeddings "
                "leave the scores equal to QKᵀ/√d + mask"
            )
        self.num_layers = len(layers)
        attention = layers[0].get_submodule("attention.self")
        self.num_heads = attention.num_attention_heads
        self.head_size = attention.attention_head_size
        self.scaling = float(getattr(attention, "scaling", self.head_size**-0.5))
        self.prefix = prefix
        base = prefix[: -len("encoder.layer")]
        self.embedding_path = f"{base}embeddings"
        self.hidden_state_paths = [f"{prefix}.{i}.output" for i in range(self.num_layers)]
        self.query_paths = [f"{prefix}.{i}.attention.self.query" for i in range(self.num_layers)]
        self.key_paths = [f"{prefix}.{i}.attention.self.key" for i in range(self.num_layers)]
        names = dict(inner.named_modules())
        self.mlm_path = "cls.predictions" if "cls.predictions" in names else None
        self.nsp_path = "cls.seq_relationship" if "cls.seq_relationship" in names else None
        specs = [self.embedding_path, *self.hidden_state_paths, *self.query_paths, *self.key_paths]
        specs += [p for p in (self.mlm_path, self.nsp_path) if p is not None]
        self._capture = FeatureCapture(inner, specs, role=type(inner).__name__)
        self._signature = inspect.signature(inner.forward)
        self._mask = None
        self._armed = False
        self._mask_handle = inner.register_forward_pre_hook(self._record_mask, with_kwargs=True)

    def _record_mask(self, module, args, kwargs):
        if self._armed:
            try:
                bound = self._signature.bind_partial(*args, **kwargs)
                self._mask = bound.arguments.get("attention_mask")
            except TypeError:
                self._mask = kwargs.get("attention_mask")

    def __enter__(self) -> "BertFeatures":
        self._mask = None
        self._armed = True
        self._capture.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._armed = False
        self._capture.__exit__(*exc)

    def hidden_states(self) -> list[torch.Tensor]:
        """The L encoder layers' outputs (B, S, H)."""
        return [self._capture.get(p) for p in self.hidden_state_paths]

    def embedding_output(self) -> torch.Tensor:
        """Hidden state 0, the embeddings' output (B, S, H)."""
        return self._capture.get(self.embedding_path)

    def attention_scores(self) -> list[torch.Tensor]:
        """The L layers' pre-softmax scores (B, heads, S, S): QKᵀ/√d + (1 − mask)·(−10⁴)."""
        adder = None
        if self._mask is not None:
            mask = self._mask
            if mask.dim() != 2:
                raise ValueError(f"BertFeatures: attention_mask: expected a (B, S) mask of 1/0, got shape {tuple(mask.shape)}")
            adder = (1.0 - mask[:, None, None, :].to(torch.float32)) * MASK_ADDER
        scores = []
        for q_path, k_path in zip(self.query_paths, self.key_paths):
            q, k = self._capture.get(q_path), self._capture.get(k_path)
            b, s, _ = q.shape
            q = q.view(b, s, self.num_heads, self.head_size).transpose(1, 2)
            k = k.view(b, k.shape[1], self.num_heads, self.head_size).transpose(1, 2)
            a = torch.matmul(q, k.transpose(-1, -2)) * self.scaling
            scores.append(a if adder is None else a + adder.to(a.dtype))
        return scores

    def mlm_logits(self) -> torch.Tensor:
        if self.mlm_path is None:
            raise ValueError("BertFeatures: the model has no cls.predictions (MLM head)")
        return self._capture.get(self.mlm_path)

    def nsp_logits(self) -> torch.Tensor:
        if self.nsp_path is None:
            raise ValueError("BertFeatures: the model has no cls.seq_relationship (NSP head)")
        return self._capture.get(self.nsp_path)

    def clear(self) -> None:
        self._capture.clear()
        self._mask = None

    def remove(self) -> None:
        """Unregister every hook: the model is as it was."""
        self._capture.remove()
        self._mask_handle.remove()
