"""Few-shot in-context classification: exact prompt strings, label scores against a hand computation on a
tiny random float64 GPT-2 and Llama with a character-level tokenizer (built locally, no download), batching against
one at a time, truncation, calibration, example selection, no parameter update, and bad input."""

import collections
import string

import pytest
import torch

from lowrank.fewshot import FewShotClassifier, PromptTemplate, select_examples

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

TEMPLATE = PromptTemplate(
    "Review: {text}\nSentiment: {label}",
    {0: "bad", 1: "good", 2: "great"},  # " good" and " great" share their first two tokens
    instruction="Rate the review.",
)
POOL = [
    {"text": "loved it", "label": 2},
    {"text": "dull plot", "label": 0},
    {"text": "fine", "label": 1},
    {"text": "a masterpiece of its kind", "label": 2},
    {"text": "meh", "label": 0},
]
QUERIES = [{"text": "wonderful"}, {"text": "no"}, {"text": "the acting was wooden and slow"}, {"text": "ok ok"}]


def char_tokenizer(padding_side="right"):
    """One token per character: every label is several tokens, and no pad token is set."""
    vocab = {char: i for i, char in enumerate(["<unk>", *string.printable])}
    model = tokenizers.models.WordLevel(vocab, unk_token="<unk>")
    tokenizer = tokenizers.Tokenizer(model)
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Split(tokenizers.Regex(r"[\s\S]"), behavior="isolated")
    wrapped = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>")
    wrapped.padding_side = padding_side
    return wrapped


def tiny_gpt2(max_positions=256, dropout=0.0):
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=len(string.printable) + 1, n_embd=32, n_layer=2, n_head=4, n_positions=max_positions,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config).double().eval()


def tiny_model(family):
    """GPT-2 (learned absolute positions) or Llama (rotary positions, grouped-query attention)."""
    if family == "gpt2":
        return tiny_gpt2()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(string.printable) + 1, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=37, max_position_embeddings=256,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).double().eval()


def hand_scores(model, tokenizer, prompt: str) -> torch.Tensor:
    """Sum of log_softmax over the label tokens, the model run on the whole prompt + continuation at once."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    scores = []
    for label in TEMPLATE.labels:
        label_ids = tokenizer(TEMPLATE.continuation(label), add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([prompt_ids + label_ids])).logits[0]
        log_probs = torch.log_softmax(logits, dim=-1)
        scores.append(sum(log_probs[len(prompt_ids) - 1 + j, token] for j, token in enumerate(label_ids)))
    return torch.stack(scores)


# ---- prompts -----------------------------------------------------------------------------------


def test_prompt_strings_are_exact():
    assert TEMPLATE.build(POOL[:2], {"text": "wonderful", "label": 1}) == (
        "Rate the review.\n\n"
        "Review: loved it\nSentiment: great\n\n"
        "Review: dull plot\nSentiment: bad\n\n"
        "Review: wonderful\nSentiment:"
    )
    bare = PromptTemplate("Q: {question} A: {answer}\n=> {label}", {"y": "yes", "n": "no"}, separator="\n---\n")
    assert bare.build([], {"question": "up?", "answer": "no"}) == "Q: up? A: no\n=>"
    assert bare.build([{"question": "1+1=2?", "answer": "2", "label": "y"}], {"question": "x", "answer": "z"}) == (
        "Q: 1+1=2? A: 2\n=> yes\n---\nQ: x A: z\n=>"
    )
    assert bare.fields == ("question", "answer") and bare.labels == ("y", "n")


def test_prompt_plus_continuation_reads_like_a_demonstration():
    example = {"text": "fine", "label": 1}
    assert TEMPLATE.continuation(1) == " good"
    assert TEMPLATE.render_query(example) + TEMPLATE.continuation(1) == TEMPLATE.render_example(example)


def test_select_examples_is_seeded():
    pool = [{"text": str(i), "label": i % 2} for i in range(20)]
    picked = select_examples(pool, 5, seed=3)
    assert picked == select_examples(pool, 5, seed=3) and len(picked) == 5
    assert picked != select_examples(pool, 5, seed=4)
    assert len({example["text"] for example in picked}) == 5  # without replacement
    assert select_examples(pool, 0) == []


def test_select_examples_balanced():
    pool = [{"text": str(i), "label": "a"} for i in range(10)] + [{"text": "b0", "label": "b"}]
    pool += [{"text": f"c{i}", "label": "c"} for i in range(3)]
    for seed in range(5):
        counts = collections.Counter(example["label"] for example in select_examples(pool, 6, seed, balanced=True))
        assert counts["b"] == 1 and sorted(counts.values()) == [1, 2, 3]  # b has one example only
        counts = collections.Counter(example["label"] for example in select_examples(pool, 3, seed, balanced=True))
        assert counts == {"a": 1, "b": 1, "c": 1}


# ---- scoring -----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("normalization", ["sum", "mean"])
def test_label_scores_equal_hand_computation(normalization, family):
    model, tokenizer = tiny_model(family), char_tokenizer()
    classifier = FewShotClassifier(model, tokenizer, TEMPLATE, normalization=normalization, batch_size=5)
    prediction = classifier.predict(QUERIES, POOL[:3])
    expected = torch.stack([hand_scores(model, tokenizer, TEMPLATE.build(POOL[:3], query)) for query in QUERIES])
    if normalization == "mean":
        expected = expected / torch.tensor([len(" bad"), len(" good"), len(" great")], dtype=torch.float64)
    assert prediction.scores.dtype == torch.float64 and prediction.scores.shape == (len(QUERIES), 3)
    torch.testing.assert_close(prediction.scores, expected, rtol=0, atol=1e-12)
    assert prediction.labels == [TEMPLATE.labels[i] for i in expected.argmax(dim=1)]
    assert prediction.num_examples == [3] * len(QUERIES)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_batching_equals_one_by_one(padding_side, family):
    model, tokenizer = tiny_model(family), char_tokenizer(padding_side)
    one_by_one = FewShotClassifier(model, tokenizer, TEMPLATE, batch_size=1)
    batched = FewShotClassifier(model, tokenizer, TEMPLATE, batch_size=7)  # 12 sequences: 7 + 5, lengths differ
    alone = torch.cat([one_by_one.predict([query], POOL[:2]).scores for query in QUERIES])
    together = batched.predict(QUERIES, POOL[:2])
    torch.testing.assert_close(together.scores, alone, rtol=0, atol=1e-12)
    torch.testing.assert_close(together.scores, one_by_one.predict(QUERIES, POOL[:2]).scores, rtol=0, atol=1e-12)


def test_long_prompts_drop_the_oldest_examples():
    tokenizer = char_tokenizer()
    model = tiny_gpt2(max_positions=128)
    classifier = FewShotClassifier(model, tokenizer, TEMPLATE)
    examples = [POOL[3], POOL[0], POOL[1], POOL[2], POOL[4]]  # the long one first, to be dropped first
    prediction = classifier.predict(QUERIES, examples)
    # Characters: instruction + separator 18, query 19 + len(text), demonstrations from the back 28, 30, 34,
    # 35, 52, label " great" 6; e.g. "wonderful" with two: 18 + 28 + 28 + 30 + 6 = 110, with three 144 > 128.
    assert prediction.num_examples == [2, 2, 1, 2]
    for query, kept, scores in zip(QUERIES, prediction.num_examples, prediction.scores):
        prompt = TEMPLATE.build(examples[len(examples) - kept :], query)
        assert len(prompt) + len(" great") <= 128 < len(TEMPLATE.build(examples[-kept - 1 :], query)) + len(" great")
        torch.testing.assert_close(scores, hand_scores(model, tokenizer, prompt), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match=r"query 1 alone takes 127 prompt tokens \+ 6 label tokens, more than .* 128"):
        classifier.predict([QUERIES[0], {"text": "x" * 90}], examples)


def test_content_free_calibration_subtracts_its_scores():
    model, tokenizer = tiny_gpt2(), char_tokenizer()
    raw = FewShotClassifier(model, tokenizer, TEMPLATE).predict(QUERIES + [{"text": "N/A"}], POOL[:2]).scores
    calibrated = FewShotClassifier(model, tokenizer, TEMPLATE, content_free_input="N/A").predict(QUERIES, POOL[:2])
    torch.testing.assert_close(calibrated.scores, raw[:-1] - raw[-1], rtol=0, atol=1e-12)
    assert calibrated.labels == [TEMPLATE.labels[i] for i in (raw[:-1] - raw[-1]).argmax(dim=1)]


def test_no_parameter_is_updated_and_the_mode_is_restored():
    model, tokenizer = tiny_gpt2(dropout=0.5), char_tokenizer()
    model.train()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    classifier = FewShotClassifier(model, tokenizer, TEMPLATE)
    first = classifier.predict(QUERIES, POOL[:2]).scores
    assert not first.requires_grad
    torch.testing.assert_close(classifier.predict(QUERIES, POOL[:2]).scores, first, rtol=0, atol=0)  # no dropout
    assert model.training
    assert all(param.grad is None for param in model.parameters())
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[name], after[name]) for name in before)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_the_model_device():
    model, tokenizer = tiny_gpt2(), char_tokenizer()
    on_cpu = FewShotClassifier(model, tokenizer, TEMPLATE).predict(QUERIES, POOL[:2])
    on_gpu = FewShotClassifier(model.cuda(), tokenizer, TEMPLATE).predict(QUERIES, POOL[:2])
    assert on_gpu.scores.device.type == "cpu" and on_gpu.labels == on_cpu.labels
    torch.testing.assert_close(on_gpu.scores, on_cpu.scores)


# ---- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "example, verbalizer, message",
    [
        ("Review: {text}\nSentiment:", {0: "bad"}, r"must contain \{label\} exactly once, got 0"),
        ("{label} {text} {label}", {0: "bad"}, r"must contain \{label\} exactly once, got 2"),
        ("Review: {text}\nSentiment: {label}.", {0: "bad"}, r"must end with \{label\}"),
        ("Review: {} {label}", {0: "bad"}, r"every field must be named like \{text\}, got \{\}"),
        ("Review: {text.upper} {label}", {0: "bad"}, r"got \{text.upper\}"),
        ("Review: {text} {label}", {}, "verbalizer must be a non-empty mapping"),
        ("Review: {text} {label}", ["bad", "good"], "verbalizer must be a non-empty mapping"),
        ("Review: {text} {label}", {0: "bad", 1: " "}, "verbalizer word for label 1 must be a non-empty str"),
        ("Review: {text} {label}", {0: "bad", 1: "bad"}, "labels share a verbalizer word"),
    ],
)
def test_bad_templates_raise(example, verbalizer, message):
    with pytest.raises(ValueError, match=message):
        PromptTemplate(example, verbalizer)


def test_bad_examples_and_queries_raise():
    with pytest.raises(ValueError, match=r"example 1 has no field 'text' \(it has \['label', 'review'\]; the template"):
        TEMPLATE.build([POOL[0], {"review": "x", "label": 0}], {"text": "q"})
    with pytest.raises(ValueError, match=r"example 0 has no field 'label'"):
        TEMPLATE.build([{"text": "x"}], {"text": "q"})
    with pytest.raises(ValueError, match=r"label 'good' is not in the verbalizer \(labels: \[0, 1, 2\]\)"):
        TEMPLATE.build([{"text": "x", "label": "good"}], {"text": "q"})
    with pytest.raises(ValueError, match="query 0 has no field 'text'"):
        TEMPLATE.build([], {"sentence": "q"})
    with pytest.raises(TypeError, match="example 0 must be a mapping of fields, got str"):
        TEMPLATE.build(["x"], {"text": "q"})


def test_bad_selection_raises():
    with pytest.raises(ValueError, match=r"k must be an int in \[0, 5\] \(the pool size\), got 6"):
        select_examples(POOL, 6)
    with pytest.raises(ValueError, match="got -1"):
        select_examples(POOL, -1)
    with pytest.raises(ValueError, match="pool example 1 has no field 'label'"):
        select_examples([POOL[0], {"text": "x"}], 1, balanced=True)


def test_bad_classifier_arguments_raise():
    model, tokenizer = tiny_gpt2(), char_tokenizer()
    with pytest.raises(ValueError, match=r"normalization must be one of \('sum', 'mean'\), got 'max'"):
        FewShotClassifier(model, tokenizer, TEMPLATE, normalization="max")
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        FewShotClassifier(model, tokenizer, TEMPLATE, batch_size=0)
    with pytest.raises(TypeError, match="template must be a lowrank.fewshot.PromptTemplate, got str"):
        FewShotClassifier(model, tokenizer, "Review: {text} {label}")
    with pytest.raises(TypeError, match="expected a Hugging Face causal LM, got Linear"):
        FewShotClassifier(torch.nn.Linear(2, 2), tokenizer, TEMPLATE)
    classifier = FewShotClassifier(model, tokenizer, TEMPLATE)
    for queries in ([], {"text": "one query, not a list"}):
        with pytest.raises(ValueError, match="queries must be a non-empty sequence of field mappings"):
            classifier.predict(queries)
    empty_query = PromptTemplate("{text}{label}", {0: "a", 1: "b"})
    with pytest.raises(ValueError, match="the prompt for query 0 encodes to no tokens"):
        FewShotClassifier(model, tokenizer, empty_query).predict([{"text": ""}])
