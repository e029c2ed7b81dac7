"""The T5 family's declaration: encoder-decoder models trained on span corruption, in Hugging Face's T5 v1.1 layout
(``model.architecture: t5``): a shared token embedding, pre-norm RMSNorm without bias, no biases, no 1/sqrt(d)
attention scaling, relative position biases (bidirectional in the encoder, causal in the decoder), a gated-GELU
feed-forward and an untied output layer; the original T5 (ReLU feed-forward, tied output layer scaled by
d_model^-0.5) is ``feed_forward: relu`` + ``tie_word_embeddings: true``. Implemented by ``mtnlg.model.t5``; exported
as T5ForConditionalGeneration (``mtnlg.convert.hf.t5``).

Depths and lengths: ``model.num_layers`` is the number of transformer blocks of both stacks together (what pipeline
stages hold: every stage needs one); ``encoder_layers`` and ``decoder_layers`` split it (default: half each).
``model.seq_length`` is the encoder's length, ``decoder_seq_length`` the decoder's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ARCHITECTURES = {
    # activation, position_embedding and tie_embeddings stay unset: T5's own keys below say them
    "t5": {"norm": "rmsnorm", "bias": False, "qkv_bias": False},
}


@dataclass(frozen=True)
class T5Knobs:
    encoder_layers: int | None = None  # default: num_layers // 2
    decoder_layers: int | None = None  # default: num_layers - encoder_layers
    decoder_seq_length: int | None = None  # default: seq_length
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    feed_forward: Literal["gated-gelu", "relu"] = "gated-gelu"
    tie_word_embeddings: bool = False  # true: the original T5 (the output layer is the embedding, input scaled)
    # pipeline stages holding the encoder (the rest hold the decoder; Megatron's split rank); None: stages are
    # balanced by FLOPs across both stacks
    encoder_pipeline_stages: int | None = None
    # span corruption (mtnlg.data.t5_dataset)
    noise_density: float = 0.15
    mean_noise_span_length: float = 3.0
    masking_style: Literal["t5", "ngram"] = "t5"  # T5/HF's random spans, or Megatron's geometric n-grams
    vocab_extra_ids: int = 100

    def depths(self, num_layers: int) -> tuple[int, int]:
        """(encoder blocks, decoder blocks) of a model of ``num_layers`` blocks."""
        enc = self.encoder_layers if self.encoder_layers is not None else (
            num_layers - self.decoder_layers if self.decoder_layers is not None else num_layers // 2)
        return enc, self.decoder_layers if self.decoder_layers is not None else num_layers - enc

    def decoder_length(self, seq_length: int) -> int:
        """The decoder's length: ``decoder_seq_length``, or what span corruption of ``seq_length`` encoder tokens
        needs (``span_plan``; the data and the model's FLOPs and memory terms use the same number)."""
        if self.decoder_seq_length:
            return self.decoder_seq_length
        if not (0.0 < self.noise_density < 1.0 and self.mean_noise_span_length >= 1.0 and seq_length >= 4):
            return seq_length  # refused with one line where the data is built (mtnlg.data.t5_span_corruption)
        return span_plan(seq_length, self.noise_density, self.mean_noise_span_length, self.masking_style)[2]


# ----------------------------------------------------------------- span corruption's lengths (the one definition)

def span_counts(length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) of a chunk of ``length`` tokens in the ``t5`` style: at least one of each, and
    at least one kept token per noise span (each span is preceded by a kept run)."""
    noise = min(max(int(round(length * noise_density)), 1), length - 1)
    spans = max(int(round(noise / mean_noise_span_length)), 1)
    return noise, min(spans, length - noise)


def corrupted_lengths(length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """(encoder input, target) lengths of a ``t5``-style corrupted chunk: kept tokens + a sentinel per span + EOS,
    and noise tokens + a sentinel per span + EOS."""
    noise, spans = span_counts(length, noise_density, mean_noise_span_length)
    return length - noise + spans + 1, noise + spans + 1


def span_plan(enc_length: int, noise_density: float, mean_noise_span_length: float, style: str
              ) -> tuple[int, int, int]:
    """(text tokens per sample, the fewest target tokens they need, the default decoder length) for an encoder input
    of ``enc_length``. ``t5``: the longest chunk whose corrupted input fits (Hugging Face's
    ``compute_input_and_target_lengths``), the decoder exactly its target; ``ngram``: ``enc_length - 1`` tokens
    (and EOS), a decoder for the worst case (a span per noise token)."""
    if style == "t5":
        raw = enc_length
        while corrupted_lengths(raw + 1, noise_density, mean_noise_span_length)[0] <= enc_length:
            raw += 1
        need = corrupted_lengths(raw, noise_density, mean_noise_span_length)[1]
        return raw, need, need
    raw = enc_length - 1
    noise = min(max(int(round(raw * noise_density)), 1), raw - 1)
    return raw, noise + 2, 2 * noise + 1  # one span: its sentinel, its tokens, EOS


def depths(m) -> tuple[int, int]:
    """(encoder blocks, decoder blocks) of a model config."""
    return (m.family_knobs or T5Knobs()).depths(m.num_layers)


def decoder_length(m) -> int:
    return (m.family_knobs or T5Knobs()).decoder_length(m.seq_length)


def _check(m, par) -> None:
    """One-line ValueErrors (the run config turns them into its ConfigError)."""
    k = m.family_knobs
    for key, use in (("activation", "model.feed_forward (gated-gelu or relu)"),
                     ("position_embedding", "T5's relative position buckets (model.relative_attention_*)"),
                     ("tie_embeddings", "model.tie_word_embeddings")):
        if getattr(m, key) is not None:
            raise ValueError(f"model.{key} is not a T5 key; remove it and use {use}")
    enc, dec = depths(m)
    if enc < 1 or dec < 1 or enc + dec != m.num_layers:
        raise ValueError(f"model.encoder_layers = {enc} and decoder_layers = {dec} must be >= 1 each and add up to "
                          f"model.num_layers = {m.num_layers} (the blocks of both stacks); state num_layers as their "
                          "sum")
    if k.relative_attention_num_buckets < 2 or k.relative_attention_max_distance < 2:
        raise ValueError("model.relative_attention_num_buckets and relative_attention_max_distance must be >= 2")
    if decoder_length(m) < 1:
        raise ValueError(f"model.decoder_seq_length = {k.decoder_seq_length} must be a positive integer")
    if par.sequence_parallel and decoder_length(m) % par.tensor:
        raise ValueError(f"parallel.sequence_parallel: model.decoder_seq_length = {decoder_length(m)} is not "
                         f"divisible by parallel.tensor = {par.tensor} (each rank holds a slice of the decoder's "
                         "sequence too); set model.decoder_seq_length to a multiple of it or turn sequence "
                         "parallelism off")
    split = k.encoder_pipeline_stages
    if split is not None:
        if par.pipeline < 2:
            raise ValueError(f"model.encoder_pipeline_stages = {split} splits the pipeline between encoder and "
                              f"decoder, but parallel.pipeline = {par.pipeline}; use parallel.pipeline >= 2 or "
                              "remove encoder_pipeline_stages")
        if not 1 <= split < par.pipeline or split > enc or par.pipeline - split > dec:
            raise ValueError(f"model.encoder_pipeline_stages = {split} must leave at least one stage to each "
                              f"stack and one block to each stage: 1 <= it <= {min(enc, par.pipeline - 1)} and "
                              f"parallel.pipeline - it <= decoder_layers = {dec}")


CHECKS = (_check,)
