"""Few-shot (in-context) classification with any Hugging Face causal LM; no parameter is updated.

PromptTemplate renders k demonstrations and a query into one prompt:
    instruction + separator + example_1 + separator + ... + example_k + separator + query
(the instruction and its separator only when there is an instruction). Each demonstration is the
example template with its named fields filled in and {label} replaced by the label's verbalizer
word; the query is the same template cut just before the label slot, with the whitespace in front
of {label} moved into the continuation. For "Review: {text}\\nSentiment: {label}" and
verbalizer {1: "positive"} the query prompt ends in "Sentiment:" and label 1's continuation is
" positive", so prompt + continuation is exactly how that example reads as a demonstration
(the leading space belongs to the label token, as byte-level BPE tokenizers such as GPT-2's
expect).

FewShotClassifier scores every label as log p(continuation | prompt), the sum of the log-probs of
the continuation's tokens (or their mean, normalization="mean"). Prompt and continuation are
tokenized separately: the prompt with the tokenizer's special tokens (a BOS where the tokenizer
adds one), the continuation without, so the scored tokens are exactly the label's tokens.
Every (query, label) pair is one sequence; sequences are sorted by length and run batch_size at a
time, padded on the tokenizer's padding_side with an attention mask and position ids counted over
the real tokens only, so a batch scores exactly like one sequence at a time.
A prompt longer than the model allows (config.max_position_embeddings, or max_length) loses
demonstrations from the front, the oldest first, until prompt and longest label fit; if even the
query alone does not fit, a ValueError says so. FewShotPrediction.num_examples tells how many
demonstrations each query kept.
With content_free_input="N/A" the scores are calibrated (Zhao et al. 2021, "Calibrate before
use"): the scores of a query whose fields all read "N/A" are subtracted, i.e.
log p(label | x) - log p(label | content-free input).
"""

from __future__ import annotations

import inspect
import random
import string
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["PromptTemplate", "select_examples", "FewShotClassifier", "FewShotPrediction"]

NORMALIZATIONS = ("sum", "mean")


@dataclass(frozen=True)
class PromptTemplate:
    """How demonstrations and the query read: example template, label words, instruction, separator.

    example      a str.format template with named fields, ending in the label field,
                 e.g. "Review: {text}\\nSentiment: {label}"
    verbalizer   label (an id or a name, as the examples store it) -> the word(s) the LM continues with
    instruction  text in front of the demonstrations ("" for none)
    separator    text between instruction, demonstrations and query
    label_field  the name of the label field in the template and in the examples
    """

    example: str
    verbalizer: Mapping[Hashable, str]
    instruction: str = ""
    separator: str = "\n\n"
    label_field: str = "label"

    def __post_init__(self):
        if not isinstance(self.example, str):
            raise TypeError(f"PromptTemplate: example must be a str template, got {type(self.example).__name__}")
        parsed = list(string.Formatter().parse(self.example))
        names = [name for _, name, _, _ in parsed if name is not None]
        for name in names:
            if not name.isidentifier():
                raise ValueError(
                    f"PromptTemplate: every field must be named like {{text}}, got {{{name}}} in {self.example!r}"
                )
        if names.count(self.label_field) != 1:
            raise ValueError(
                f"PromptTemplate: the example template must contain {{{self.label_field}}} exactly once, "
                f"got {names.count(self.label_field)} in {self.example!r}"
            )
        # The label is scored as the continuation of the prompt, so nothing may follow it.
        if parsed[-1][1] != self.label_field:
            raise ValueError(
                f"PromptTemplate: the example template must end with {{{self.label_field}}}, got {self.example!r}"
            )
        if not isinstance(self.verbalizer, Mapping) or not self.verbalizer:
            raise ValueError(
                f"PromptTemplate: verbalizer must be a non-empty mapping label -> word(s), got {self.verbalizer!r}"
            )
        for label, word in self.verbalizer.items():
            if not isinstance(word, str) or not word.strip():
                raise ValueError(
                    f"PromptTemplate: the verbalizer word for label {label!r} must be a non-empty str, got {word!r}"
                )
        words = list(self.verbalizer.values())
        if len(set(words)) != len(words):
            raise ValueError(f"PromptTemplate: labels share a verbalizer word, so they cannot be told apart: {words}")
        object.__setattr__(self, "verbalizer", dict(self.verbalizer))  # a copy, so it stays as validated
        head = self.example[: self.example.rindex("{" + self.label_field)]
        object.__setattr__(self, "_query_template", head.rstrip())
        object.__setattr__(self, "_label_lead", head[len(head.rstrip()):])
        object.__setattr__(self, "fields", tuple(name for name in names if name != self.label_field))

    @property
    def labels(self) -> tuple:
        return tuple(self.verbalizer)

    def continuation(self, label: Hashable) -> str:
        """The text the LM is scored on for `label`: the whitespace before the label slot + its word."""
        return self._label_lead + self.verbalizer[self._check_label(label)]

    def render_example(self, example: Mapping, index: int = 0) -> str:
        """A demonstration: every field filled in, the label as its verbalizer word."""
        label = self._check_label(self._field(example, self.label_field, f"example {index}"))
        filled = self._query_template.format(**self._values(example, f"example {index}"))
        return filled + self._label_lead + self.verbalizer[label]

    def render_query(self, query: Mapping, index: int = 0) -> str:
        """The query: the template up to (not including) the label slot; a label in `query` is ignored."""
        return self._query_template.format(**self._values(query, f"query {index}"))

    def build(self, examples: Sequence[Mapping], query: Mapping, query_index: int = 0) -> str:
        """The whole prompt: instruction, demonstrations and query, joined by the separator."""
        parts = [self.instruction] if self.instruction else []
        parts += [self.render_example(example, i) for i, example in enumerate(examples)]
        return self.separator.join(parts + [self.render_query(query, query_index)])

    def _field(self, record: Mapping, name: str, where: str):
        if not isinstance(record, Mapping):
            raise TypeError(f"PromptTemplate: {where} must be a mapping of fields, got {type(record).__name__}")
        if name not in record:
            raise ValueError(
                f"PromptTemplate: {where} has no field {name!r} (it has {sorted(record)}; the template needs "
                f"{sorted(self.fields + (self.label_field,))})"
            )
        return record[name]

    def _values(self, record: Mapping, where: str) -> dict:
        return {name: self._field(record, name, where) for name in self.fields}

    def _check_label(self, label):
        if label not in self.verbalizer:
            raise ValueError(
                f"PromptTemplate: label {label!r} is not in the verbalizer (labels: {list(self.verbalizer)})"
            )
        return label


def select_examples(
    pool: Sequence[Mapping], k: int, seed: int = 0, balanced: bool = False, label_field: str = "label"
) -> list:
    """k demonstrations drawn from `pool` without replacement, the same ones for the same seed.

    balanced=True deals the classes round-robin (in a seeded order), so class counts differ by at
    most one where the pool allows; the picks are then shuffled so no class pattern recurs."""
    pool = list(pool)
    if not isinstance(k, int) or not 0 <= k <= len(pool):
        raise ValueError(f"select_examples: k must be an int in [0, {len(pool)}] (the pool size), got {k!r}")
    rng = random.Random(seed)
    if not balanced:
        return rng.sample(pool, k)
    by_class: dict = {}
    for index, example in enumerate(pool):
        if label_field not in example:
            raise ValueError(f"select_examples: pool example {index} has no field {label_field!r}")
        by_class.setdefault(example[label_field], []).append(example)
    classes = list(by_class)
    rng.shuffle(classes)
    for members in by_class.values():
        rng.shuffle(members)
    dealt = [by_class[c][i] for i in range(max(map(len, by_class.values()))) for c in classes if i < len(by_class[c])]
    picked = dealt[:k]
    rng.shuffle(picked)
    return picked


@dataclass
class FewShotPrediction:
    """labels: the best label per query; scores: [num_queries, num_labels], columns in
    FewShotClassifier.labels order; num_examples: demonstrations each prompt kept after truncation."""

    labels: list
    scores: torch.Tensor
    num_examples: list[int]


class FewShotClassifier:
    """Classify queries by the LM's log-probability of each label's continuation after a few-shot prompt."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        template: PromptTemplate,
        normalization: str = "sum",
        batch_size: int = 16,
        max_length: int | None = None,
        content_free_input: str | None = None,
    ):
        owner = "FewShotClassifier"
        if not isinstance(template, PromptTemplate):
            raise TypeError(
                f"{owner}: template must be a lowrank.fewshot.PromptTemplate, got {type(template).__name__}"
            )
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"{owner}: normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"{owner}: batch_size must be a positive int, got {batch_size!r}")
        get_input_embeddings = getattr(model, "get_input_embeddings", None)
        if not callable(get_input_embeddings):
            raise TypeError(f"{owner}: expected a Hugging Face causal LM, got {type(model).__name__}")
        self.padding_side = getattr(tokenizer, "padding_side", "right")
        self.takes_position_ids = "position_ids" in inspect.signature(model.forward).parameters
        if self.padding_side == "left" and not self.takes_position_ids:
            raise ValueError(f"{owner}: {type(model).__name__} takes no position_ids, so left padding would shift "
                             "positions; set tokenizer.padding_side = 'right'")  # fmt: skip
        config = getattr(model, "config", None)
        self.max_length = max_length if max_length is not None else getattr(config, "max_position_embeddings", None)
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.normalization, self.batch_size, self.content_free_input = normalization, batch_size, content_free_input
        self.labels = template.labels
        self.label_ids = [self._encode(template.continuation(label), special_tokens=False) for label in self.labels]
        for label, ids in zip(self.labels, self.label_ids):
            if not ids:
                raise ValueError(f"{owner}: the continuation of label {label!r} encodes to no tokens")

    def predict(self, queries: Sequence[Mapping], examples: Sequence[Mapping] = ()) -> FewShotPrediction:
        """Score every label for every query, each prompt holding the same demonstrations `examples`."""
        if isinstance(queries, Mapping) or not isinstance(queries, Sequence) or not queries:
            raise ValueError("FewShotClassifier.predict: queries must be a non-empty sequence of field mappings")
        prompts = [self._encode_prompt(query, list(examples), index) for index, query in enumerate(queries)]
        scores = self._score([ids for ids, _ in prompts])
        if self.content_free_input is not None:
            content_free = {name: self.content_free_input for name in self.template.fields}
            scores = scores - self._score([self._encode_prompt(content_free, list(examples), "content-free")[0]])
        best = scores.argmax(dim=1).tolist()
        return FewShotPrediction([self.labels[i] for i in best], scores, [kept for _, kept in prompts])

    def _encode(self, text: str, special_tokens: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special_tokens)["input_ids"])

    def _encode_prompt(self, query: Mapping, examples: list, index) -> tuple[list[int], int]:
        """The prompt's ids with as many demonstrations as fit, dropping the oldest first."""
        longest_label = max(map(len, self.label_ids))
        for dropped in range(len(examples) + 1):
            ids = self._encode(self.template.build(examples[dropped:], query, index), special_tokens=True)
            if not ids:
                raise ValueError(f"FewShotClassifier: the prompt for query {index} encodes to no tokens; the first "
                                 "label token needs at least one token before it")  # fmt: skip
            if self.max_length is None or len(ids) + longest_label <= self.max_length:
                return ids, len(examples) - dropped
        raise ValueError(
            f"FewShotClassifier: query {index} alone takes {len(ids)} prompt tokens + {longest_label} label tokens, "
            f"more than the model's {self.max_length} positions"
        )

    def _score(self, prompts: list[list[int]]) -> torch.Tensor:
        """[len(prompts), num_labels] label scores, running batch_size (prompt, label) sequences at a time."""
        pairs = [(prompt, label) for prompt in prompts for label in self.label_ids]
        order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
        log_likelihoods = [None] * len(pairs)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                for start in range(0, len(order), self.batch_size):
                    chunk = order[start : start + self.batch_size]
                    for i, value in zip(chunk, self._log_likelihoods([pairs[i] for i in chunk])):
                        log_likelihoods[i] = value
        finally:
            self.model.train(was_training)
        scores = torch.stack(log_likelihoods).view(len(prompts), len(self.labels))
        if self.normalization == "mean":
            scores = scores / torch.tensor([len(ids) for ids in self.label_ids], dtype=scores.dtype)
        return scores

    def _log_likelihoods(self, pairs: list[tuple[list[int], list[int]]]) -> torch.Tensor:
        """Sum of log p(label token | everything before it) per (prompt ids, label ids) pair, in one forward pass."""
        device = self.model.get_input_embeddings().weight.device
        width = max(len(prompt) + len(label) for prompt, label in pairs)
        label_width = max(len(label) for _, label in pairs)
        # Padded positions are masked out, so any valid id works there; 0 needs no pad token.
        input_ids = torch.zeros(len(pairs), width, dtype=torch.long)
        attention_mask = torch.zeros(len(pairs), width, dtype=torch.long)
        logit_positions = torch.zeros(len(pairs), label_width, dtype=torch.long)
        targets = torch.zeros(len(pairs), label_width, dtype=torch.long)
        is_label = torch.zeros(len(pairs), label_width, dtype=torch.bool)
        for row, (prompt, label) in enumerate(pairs):
            length = len(prompt) + len(label)
            start = width - length if self.padding_side == "left" else 0
            input_ids[row, start : start + length] = torch.tensor(prompt + label)
            attention_mask[row, start : start + length] = 1
            # The logits at position t predict the token at t + 1.
            first_label = start + len(prompt)
            logit_positions[row, : len(label)] = torch.arange(first_label - 1, first_label - 1 + len(label))
            targets[row, : len(label)] = torch.tensor(label)
            is_label[row, : len(label)] = True
        inputs = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device), "use_cache": False}
        if self.takes_position_ids:
            inputs["position_ids"] = (attention_mask.cumsum(1) - 1).clamp(min=0).to(device)
        logits = self.model(**inputs).logits
        picked = logits.gather(1, logit_positions.to(device)[..., None].expand(-1, -1, logits.shape[-1]))
        log_probs = picked.to(torch.promote_types(picked.dtype, torch.float32)).log_softmax(-1)
        token_log_probs = log_probs.gather(-1, targets.to(device)[..., None]).squeeze(-1).cpu()
        return torch.where(is_label, token_log_probs, 0).sum(1)
