"""Prefix interpretability: read ClipCap's prefix vectors back as language model tokens.

The ClipCap paper interprets a prefix by mapping each of its vectors to the vocabulary token whose input embedding
is closest by cosine similarity. This module does that for any batch of prefixes and any token embedding matrix.

It needs torch only, on purpose: `modeling_clipcap.py` imports it, so it is saved next to the model code for
`trust_remote_code` loading, and must not pull in anything that model folder cannot provide.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class TokenMatch:
    """One vocabulary token near a prefix vector."""

    token_id: int
    """The token's id in the language model's vocabulary."""
    token: str | None
    """The token decoded on its own, or `None` when no tokenizer was given. A token that starts a word keeps its
    leading space, as GPT-2's byte-level tokens decode and SentencePiece's (its "▁") alike: `' do'`, not `'do'`."""
    similarity: float
    """Cosine similarity between the prefix vector and the token's input embedding, in [-1, 1]."""

    @property
    def label(self) -> str:
        """The token quoted (so that leading spaces and control characters show), or its id when not decoded."""
        return repr(self.token) if self.token is not None else f"#{self.token_id}"


@dataclass(frozen=True)
class PrefixInterpretation:
    """The nearest tokens of every prefix vector of one image."""

    matches: list[list[TokenMatch]]
    """`matches[position]` lists the `top_k` nearest tokens of that prefix vector, most similar first."""

    @property
    def tokens(self) -> list[str | None]:
        """The nearest token of each prefix vector: the paper's reading of the prefix as words."""
        return [position[0].token for position in self.matches]

    def format_matches(self) -> list[str]:
        """Each prefix position's nearest tokens on one line, most similar first, each with its similarity."""
        return [
            "  ".join(f"{match.label} {match.similarity:.3f}" for match in candidates) for candidates in self.matches
        ]

    def format(self) -> str:
        """One line per prefix position: its position, then its nearest tokens (see `format_matches`)."""
        return "\n".join(f"{position:>3}: {line}" for position, line in enumerate(self.format_matches()))


def count_candidate_tokens(num_embeddings: int, tokenizer=None, excluded_token_ids: Iterable[int] = ()) -> int:
    """
    How many tokens [`interpret_prefix_embeds`] chooses among, the most `top_k` may be: the embedding rows that the
    tokenizer (or processor), when given, has tokens for, less the excluded ones.
    """
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor decodes with its tokenizer
    vocab_size = num_embeddings if tokenizer is None else min(num_embeddings, len(tokenizer))
    return vocab_size - len(_excluded_rows(excluded_token_ids, vocab_size))


def _excluded_rows(excluded_token_ids: Iterable[int], vocab_size: int) -> list[int]:
    """The excluded token ids that are rows of a vocabulary of `vocab_size` tokens, each once, in order."""
    return sorted({token_id for token_id in excluded_token_ids if 0 <= token_id < vocab_size})


def nearest_tokens(
    prefix_embeds: torch.Tensor,
    token_embeddings: torch.Tensor,
    top_k: int = 5,
    excluded_token_ids: Iterable[int] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    The `top_k` tokens whose embeddings are most cosine-similar to each prefix vector.

    Args:
        prefix_embeds (`torch.Tensor` of shape `(batch_size, prefix_length, width)`):
            Prefix vectors, e.g. from [`ClipCapForConditionalGeneration.get_prefix_embeds`].
        token_embeddings (`torch.Tensor` of shape `(vocab_size, width)`):
            The language model's input embedding matrix.
        top_k (`int`, *optional*, defaults to 5):
            How many tokens to keep per prefix vector.
        excluded_token_ids (`Iterable[int]`, *optional*):
            Tokens that are never candidates, e.g. ClipCap's image placeholder token (`config.image_token_id`), which
            no text holds.

    Returns:
        `tuple(torch.Tensor, torch.Tensor)`: the similarities and the token ids, both of shape
        `(batch_size, prefix_length, top_k)`, most similar first.
    """
    # Checked first: a single prefix of shape (prefix_length, width) would otherwise be read as a batch of
    # vectors and fail later with an unrelated error.
    if prefix_embeds.ndim != 3:
        raise ValueError(
            "`prefix_embeds` must have shape (batch_size, prefix_length, width), got "
            f"{tuple(prefix_embeds.shape)}; for one image's prefix, pass `prefix_embeds[None]`."
        )
    if token_embeddings.ndim != 2:
        raise ValueError(
            "`token_embeddings` must have shape (vocab_size, width), got "
            f"{tuple(token_embeddings.shape)}; pass the language model's input embedding matrix."
        )
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral):  # numpy's integers too
        raise TypeError(f"`top_k` must be an int, how many tokens to keep per prefix vector; got {top_k!r}.")
    top_k = int(top_k)
    excluded = _excluded_rows(excluded_token_ids, token_embeddings.shape[0])
    candidates = token_embeddings.shape[0] - len(excluded)
    if top_k < 1 or top_k > candidates:
        without = f", not counting the excluded tokens {excluded}" if excluded else ""
        raise ValueError(f"`top_k` must be between 1 and the vocabulary size ({candidates}{without}), got {top_k}.")
    if prefix_embeds.shape[-1] != token_embeddings.shape[-1]:
        raise ValueError(
            f"Prefix vectors have width {prefix_embeds.shape[-1]} but token embeddings have width "
            f"{token_embeddings.shape[-1]}; they must come from the same model."
        )
    _check_finite(prefix_embeds)
    # float32: half-precision cosine similarities lose the ordering between close tokens.
    prefix = F.normalize(prefix_embeds.detach().float(), dim=-1)
    vocabulary = F.normalize(token_embeddings.detach().to(prefix.device, torch.float32), dim=-1)
    similarities = prefix @ vocabulary.T
    similarities[..., excluded] = float("-inf")  # never chosen: `top_k` is at most the other tokens' count
    return similarities.topk(top_k, dim=-1)


def _check_finite(prefix_embeds: torch.Tensor) -> None:
    """Refuse NaN or infinite prefix vectors, which have no direction: they would read as arbitrary tokens."""
    bad = ~torch.isfinite(prefix_embeds.detach()).all(dim=-1)
    if not bool(bad.any()):
        return
    images = bad.any(dim=-1).nonzero().flatten().tolist()
    where = "; ".join(
        f"image {image}: positions {bad[image].nonzero().flatten().tolist()}" for image in images[:3]
    ) + ("; ..." if len(images) > 3 else "")
    raise ValueError(
        f"`prefix_embeds` holds NaN or infinite values ({where}), which match no token. The model likely overflowed, "
        "as float16 does: run it in float32 or bfloat16, or check the image embeddings and the model's weights."
    )


def _byte_level_alphabet() -> dict[str, int]:
    """The byte each character of GPT-2's byte-level BPE alphabet stands for (the printable bytes stand for
    themselves; the others are shifted to characters from U+0100 on)."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)}
    alphabet, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            alphabet[chr(byte)] = byte
        else:
            alphabet[chr(256 + shifted)] = byte
            shifted += 1
    return alphabet


_BYTE_LEVEL_ALPHABET = _byte_level_alphabet()


# SentencePiece's word-start marker (Llama, T5, ...), which `decode` strips from the first token of a text.
_WORD_START = "\u2581"


def _token_text(tokenizer, token_id: int) -> str:
    """
    A token's own text, a word-start token's leading space kept: GPT-2's byte-level "Ġdo" decodes to " do" alone, and
    SentencePiece's "▁do", which `decode` gives as "do" (the start of a text), reads " do" too. A byte-level token
    holding part of a multi-byte character, which decodes to U+FFFD alone, shows those bytes instead, and its other
    characters as they are: GPT-2's "Ã" (byte 0xC3, the first half of "é") as "<0xC3>", "Ãm" as "<0xC3>m".
    """
    # Without the clean-up that drops the space before punctuation (" ," would read ","), which 4.x tokenizers saved
    # with `clean_up_tokenization_spaces=True` apply to byte-level tokens too.
    text = tokenizer.decode([token_id], clean_up_tokenization_spaces=False)
    token = tokenizer.convert_ids_to_tokens(token_id)
    if isinstance(token, str) and token.startswith(_WORD_START) and not text.startswith(" "):
        return " " + text
    if "\ufffd" not in text:
        return text
    if not isinstance(token, str) or not token or any(char not in _BYTE_LEVEL_ALPHABET for char in token):
        return text  # not a byte-level token (sentencepiece's byte tokens already read "<0xC3>")
    raw = bytes(_BYTE_LEVEL_ALPHABET[char] for char in token)
    # Each byte outside a complete character becomes a lone surrogate (U+DC00 + byte), shown as its value; the
    # characters after it read as themselves.
    return "".join(
        f"<0x{ord(char) - 0xDC00:02X}>" if "\udc80" <= char <= "\udcff" else char
        for char in raw.decode("utf-8", errors="surrogateescape")
    )


def interpret_prefix_embeds(
    prefix_embeds: torch.Tensor,
    token_embeddings: torch.Tensor,
    tokenizer=None,
    top_k: int = 5,
    excluded_token_ids: Iterable[int] = (),
) -> list[PrefixInterpretation]:
    """
    Read a batch of prefixes back as tokens: each prefix vector's `top_k` nearest tokens by cosine similarity.

    Args:
        prefix_embeds (`torch.Tensor` of shape `(batch_size, prefix_length, width)`):
            Prefix vectors.
        token_embeddings (`torch.Tensor` of shape `(vocab_size, width)`):
            The language model's input embedding matrix.
        tokenizer (*optional*):
            The language model's tokenizer, or a processor holding it. It decodes the tokens, and limits the
            candidates to its vocabulary: embedding matrices padded beyond it hold rows that are never a token.
        top_k (`int`, *optional*, defaults to 5):
            How many tokens to keep per prefix vector.
        excluded_token_ids (`Iterable[int]`, *optional*):
            Tokens that are never candidates: pass ClipCap's image placeholder token (`config.image_token_id`), which
            no text holds, as [`ClipCapForConditionalGeneration.interpret_prefix`] does.

    Returns:
        `list[PrefixInterpretation]`: one per image.
    """
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor decodes with its tokenizer
    if tokenizer is not None:
        if not all(callable(getattr(tokenizer, name, None)) for name in ("decode", "convert_ids_to_tokens")):
            raise TypeError(
                "`tokenizer` must be the language model's tokenizer or the model's processor, objects with `decode` "
                f"and `convert_ids_to_tokens`; got the {type(tokenizer).__name__} {tokenizer!r:.100}. Load it first, "
                "e.g. `AutoProcessor.from_pretrained(model_folder)`."
            )
        token_embeddings = token_embeddings[: len(tokenizer)]
    similarities, token_ids = nearest_tokens(prefix_embeds, token_embeddings, top_k, excluded_token_ids)
    similarities, token_ids = similarities.tolist(), token_ids.tolist()
    interpretations = []
    for image_similarities, image_token_ids in zip(similarities, token_ids):
        matches = []
        for position_similarities, position_ids in zip(image_similarities, image_token_ids):
            # Decoded one by one: each token's own text, not a merged string.
            texts = [_token_text(tokenizer, token_id) if tokenizer is not None else None for token_id in position_ids]
            matches.append([TokenMatch(*match) for match in zip(position_ids, texts, position_similarities)])
        interpretations.append(PrefixInterpretation(matches))
    return interpretations


__all__ = [
    "PrefixInterpretation", "TokenMatch", "count_candidate_tokens", "interpret_prefix_embeds", "nearest_tokens"
]
