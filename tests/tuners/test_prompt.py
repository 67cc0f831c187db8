"""Prompt and prefix tuning (lowrank.tuners.prompt).

Prompt tuning: SoftPrompt on its own, PromptTuningModel on tiny random BERT / GPT-2 / Llama (no
downloads) and on the real all-MiniLM-L6-v2, against the model run on the prompt's tokens and against PEFT.
Prefix tuning: PrefixEncoder, PrefixAttention against a float64 reference, PrefixTuningModel on the same
models (against the model's own cache and against PEFT) and on the real all-MiniLM-L6-v2."""

import copy
import functools
import math
import os

import pytest
import torch
from torch import nn

from lowrank import (
    PrefixTuningModel,
    PromptTuningModel,
    load_prompt,
    mark_only_prompt_trainable,
    prefix_tuning,
    prompt_tuning,
    save_prompt,
)
from lowrank.nn import PrefixAttention, PrefixEncoder, SoftPrompt

transformers = pytest.importorskip("transformers")

VOCAB, DIM, MAX_POSITIONS = 100, 32, 24


@pytest.fixture
def tiny_model(tiny_hf_model):
    return functools.partial(
        tiny_hf_model, head=True, vocab=VOCAB, dim=DIM, heads=4, kv_heads=2, intermediate=37, positions=MAX_POSITIONS
    )


FAMILIES = ["bert", "gpt2", "llama"]
PROMPT_IDS = [7, 3, 42, 9]


def fake_tokenizer(text):
    """Stands in for a tokenizer: the same ids for any text."""
    return {"input_ids": PROMPT_IDS[:2]}


def batch(seq_len=5):
    input_ids = torch.randint(0, VOCAB, (2, seq_len), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones(2, seq_len, dtype=torch.long)
    attention_mask[1, 3:] = 0
    return input_ids, attention_mask


def first_output(output):
    return output.logits if hasattr(output, "logits") else output.last_hidden_state


# ---- SoftPrompt on its own -------------------------------------------------------------------


def test_soft_prompt_prepends_to_any_embeddings_and_extends_the_mask():
    prompt = SoftPrompt(3, 8)
    embeds = torch.randn(2, 5, 8, dtype=torch.float64)
    out = prompt(embeds)
    assert out.shape == (2, 8, 8) and out.dtype == torch.float64
    torch.testing.assert_close(out[:, 3:], embeds, rtol=0, atol=0)
    torch.testing.assert_close(out[:, :3], prompt.weight.double().expand(2, 3, 8), rtol=0, atol=0)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])
    assert prompt.extend_attention_mask(mask).tolist() == [[1, 1, 1, 1, 1, 0, 0, 0], [1] * 8]
    out.sum().backward()
    assert prompt.weight.grad.shape == (3, 8)


def test_soft_prompt_inits():
    embedding = nn.Embedding(50, 8)
    vocab = SoftPrompt(4, 8, init="vocab", embedding=embedding, generator=torch.Generator().manual_seed(0))
    expected_ids = torch.randint(0, 50, (4,), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(vocab.weight.detach(), embedding.weight[expected_ids].detach(), rtol=0, atol=0)
    # PEFT's TEXT init: two text tokens repeated to fill five virtual tokens
    text = SoftPrompt(5, 8, init="text", embedding=embedding, init_text="any", tokenizer=fake_tokenizer)
    torch.testing.assert_close(text.weight.detach(), embedding.weight[[7, 3, 7, 3, 7]].detach(), rtol=0, atol=0)
    short = SoftPrompt(1, 8, init="text", embedding=embedding, init_text="any", tokenizer=fake_tokenizer)
    torch.testing.assert_close(short.weight.detach(), embedding.weight[[7]].detach(), rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_virtual_tokens=0, dim=8), "num_virtual_tokens must be a positive integer"),
        (dict(num_virtual_tokens=2, dim=8, init="zeros"), "init must be one of"),
        (dict(num_virtual_tokens=2, dim=8, init="vocab"), "needs embedding="),
        (dict(num_virtual_tokens=2, dim=6, init="vocab", embedding=nn.Embedding(5, 8)), "embedding has dim 8"),
        (dict(num_virtual_tokens=2, dim=8, init="text", embedding=nn.Embedding(5, 8)), "non-empty init_text"),
        (dict(num_virtual_tokens=2, dim=8, init="text", embedding=nn.Embedding(5, 8), init_text="a"), "tokenizer"),
        (
            dict(num_virtual_tokens=2, dim=8, init="text", embedding=nn.Embedding(5, 8), init_text="a",
                 tokenizer=fake_tokenizer),
            "token id 7",
        ),  # fmt: skip
    ],
)
def test_soft_prompt_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=f"SoftPrompt: .*{message}"):
        SoftPrompt(**kwargs)


def test_soft_prompt_bad_inputs():
    prompt = SoftPrompt(3, 8)
    with pytest.raises(ValueError, match=r"SoftPrompt: embeds must be \[batch, seq_len, 8\], got \(2, 5, 6\)"):
        prompt(torch.randn(2, 5, 6))
    with pytest.raises(ValueError, match=r"SoftPrompt: embeds must be .* got \(5, 8\)"):
        prompt(torch.randn(5, 8))
    with pytest.raises(ValueError, match=r"SoftPrompt: the attention mask must be \[batch, seq_len\]"):
        prompt.extend_attention_mask(torch.ones(2, 1, 5))


# ---- the prompt-tuning wrapper on Hugging Face models ----------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_equals_running_the_model_on_the_prompt_tokens(tiny_model, family):
    """A prompt initialised from the embeddings of tokens p makes the model see [p, x]: same masks, positions."""
    model = tiny_model(family)
    wrapped = prompt_tuning(
        copy.deepcopy(model), 4, init="text", init_text="any", tokenizer=lambda text: {"input_ids": PROMPT_IDS}
    )
    input_ids, attention_mask = batch()
    prefix_ids = torch.tensor(PROMPT_IDS).expand(2, 4)
    full_ids, full_mask = (
        torch.cat((prefix_ids, input_ids), 1),
        torch.cat((torch.ones(2, 4, dtype=torch.long), attention_mask), 1),
    )
    with torch.no_grad():
        out = first_output(wrapped(input_ids=input_ids, attention_mask=attention_mask))
        expected = first_output(model(input_ids=full_ids, attention_mask=full_mask))
        assert out.shape[:2] == (2, 9)
        real = full_mask.bool()  # padded positions carry no meaning
        torch.testing.assert_close(out[real], expected[real], rtol=1e-5, atol=1e-5)
        # explicit positions 0..T-1 become 0..n+T-1, the model's default
        positions = torch.arange(5).expand(2, 5)
        with_positions = first_output(
            wrapped(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions)
        )
        torch.testing.assert_close(with_positions[real], expected[real], rtol=1e-5, atol=1e-5)
        if family == "bert":  # virtual tokens get token type 0, real ones keep theirs
            types = torch.ones(2, 5, dtype=torch.long)
            typed = first_output(wrapped(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=types))
            full_types = torch.cat((torch.zeros(2, 4, dtype=torch.long), types), 1)
            expected_typed = first_output(
                model(input_ids=full_ids, attention_mask=full_mask, token_type_ids=full_types)
            )
            torch.testing.assert_close(typed[real], expected_typed[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_causal_lm_labels_are_ignored_on_virtual_tokens(tiny_model, family):
    model = tiny_model(family)
    wrapped = prompt_tuning(copy.deepcopy(model), 3)
    input_ids, attention_mask = batch()
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    with torch.no_grad():
        out = wrapped(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        # next-token loss on real tokens only; the last virtual position predicts the first real token
        logits = out.logits[:, 2:-1]
        expected = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_outputs_match_peft_prompt_tuning(tiny_model, family):
    peft = pytest.importorskip("peft")
    model = tiny_model(family)
    wrapped = prompt_tuning(copy.deepcopy(model), 3, init="vocab")
    task = "FEATURE_EXTRACTION" if family == "bert" else "CAUSAL_LM"
    peft_model = peft.get_peft_model(
        copy.deepcopy(model), peft.PromptTuningConfig(task_type=task, num_virtual_tokens=3)
    )
    peft_model.prompt_encoder["default"].embedding.weight.data.copy_(wrapped.prompt.weight)
    input_ids, attention_mask = batch()
    with torch.no_grad():
        ours = first_output(wrapped(input_ids=input_ids, attention_mask=attention_mask))
        theirs = first_output(peft_model(input_ids=input_ids, attention_mask=attention_mask))
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def test_prompt_wrapper_bad_inputs(tiny_model):
    model = tiny_model("bert")
    wrapped = prompt_tuning(model, 4)
    input_ids, attention_mask = batch()
    with pytest.raises(
        ValueError,
        match=r"PromptTuningModel: 4 virtual tokens \+ 21 input tokens = 25 positions.*max_position_embeddings=24",
    ):
        wrapped(input_ids=torch.zeros(1, 21, dtype=torch.long))
    with pytest.raises(
        ValueError, match=r"PromptTuningModel: attention_mask must be \[batch, seq_len\] = \(2, 5\), got \(2, 4\)"
    ):
        wrapped(input_ids=input_ids, attention_mask=attention_mask[:, :4])
    with pytest.raises(ValueError, match=r"PromptTuningModel: token_type_ids must be \[batch, seq_len\]"):
        wrapped(input_ids=input_ids, token_type_ids=torch.zeros(2, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="PromptTuningModel: pass exactly one of input_ids"):
        wrapped(input_ids=input_ids, inputs_embeds=torch.randn(2, 5, DIM))
    with pytest.raises(ValueError, match="PromptTuningModel: a cache .* is not supported"):
        wrapped(input_ids=input_ids, cache=transformers.DynamicCache())
    with pytest.raises(
        ValueError, match="PromptTuningModel: the soft prompt has dim 16, but BertModel's input embeddings have dim 32"
    ):
        PromptTuningModel(model, SoftPrompt(4, 16))
    with pytest.raises(ValueError, match="PromptTuningModel: Linear has no get_input_embeddings"):
        PromptTuningModel(nn.Linear(4, 4), SoftPrompt(4, 4))


def test_save_and_load_only_the_prompt(tiny_model, tmp_path):
    wrapped = prompt_tuning(tiny_model("gpt2"), 3)
    save_prompt(wrapped, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["prompt_config.json", "prompt_model.safetensors"]
    from safetensors.torch import load_file

    assert list(load_file(tmp_path / "prompt_model.safetensors")) == ["prompt.weight"]
    other = prompt_tuning(tiny_model("gpt2"), 3)
    nn.init.zeros_(other.prompt.weight)
    load_prompt(other, tmp_path)
    assert torch.equal(other.prompt.weight, wrapped.prompt.weight)
    with pytest.raises(
        ValueError,
        match=r"load_prompt: prompt module 'prompt' was saved as .*'num_virtual_tokens': 3.* "
        r"the model's is .*'num_virtual_tokens': 5",
    ):
        load_prompt(prompt_tuning(tiny_model("gpt2"), 5), tmp_path)
    with pytest.raises(
        ValueError, match=r"load_prompt: the file has prompt modules \['prompt'\], the model has \[''\]"
    ):
        load_prompt(SoftPrompt(3, DIM), tmp_path)


# ---- PrefixEncoder and PrefixAttention ------------------------------------------------------


@pytest.mark.parametrize("projection_dim", [None, 6])
def test_prefix_encoder_layout(projection_dim):
    encoder = PrefixEncoder(3, num_layers=2, num_heads=4, head_dim=5, projection_dim=projection_dim)
    pairs = encoder(batch_size=2)
    assert len(pairs) == 2 and all(t.shape == (2, 4, 3, 5) for pair in pairs for t in pair)
    flat = encoder.embedding.weight if projection_dim is None else encoder.transform(encoder.embedding.weight)
    # per virtual token: [layer][key, value][head][head_dim]
    flat = flat.view(3, 2, 2, 4, 5)
    for layer, (key, value) in enumerate(pairs):
        torch.testing.assert_close(key[1], flat[:, layer, 0].transpose(0, 1), rtol=0, atol=0)
        torch.testing.assert_close(value[0], flat[:, layer, 1].transpose(0, 1), rtol=0, atol=0)


def reference_prefix_attention(module: PrefixAttention, x, attention_mask, is_causal):
    """Float64 multi-head attention over [prefix; sequence], written out."""
    x = x.double()
    weight = {name: getattr(module, name).weight.double() for name in ("q_proj", "k_proj", "v_proj", "out_proj")}
    bias = {name: getattr(module, name).bias.double() for name in weight}
    batch, seq_len, dim = x.shape
    heads, head_dim, n = module.num_heads, module.head_dim, module.prefix.num_virtual_tokens
    flat = module.prefix.embedding.weight.double().view(n, 2, heads, head_dim)
    out = torch.zeros(batch, seq_len, dim, dtype=torch.float64)
    for b in range(batch):
        q = (x[b] @ weight["q_proj"].T + bias["q_proj"]).view(seq_len, heads, head_dim)
        k = torch.cat((flat[:, 0], (x[b] @ weight["k_proj"].T + bias["k_proj"]).view(seq_len, heads, head_dim)))
        v = torch.cat((flat[:, 1], (x[b] @ weight["v_proj"].T + bias["v_proj"]).view(seq_len, heads, head_dim)))
        for h in range(heads):
            scores = q[:, h] @ k[:, h].T / math.sqrt(head_dim)
            for i in range(seq_len):
                for j in range(seq_len):
                    masked = (attention_mask is not None and attention_mask[b, j] == 0) or (is_causal and j > i)
                    if masked:
                        scores[i, n + j] = -math.inf
            out[b, :, h * head_dim : (h + 1) * head_dim] = scores.softmax(-1) @ v[:, h]
    return out @ weight["out_proj"].T + bias["out_proj"]


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("with_mask", [False, True])
def test_prefix_attention_matches_float64_reference(is_causal, with_mask):
    torch.manual_seed(0)
    module = PrefixAttention(12, 3, num_virtual_tokens=2)
    x = torch.randn(2, 5, 12)
    attention_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]) if with_mask else None
    out = module(x, attention_mask, is_causal=is_causal)
    assert out.shape == (2, 5, 12)
    expected = reference_prefix_attention(module, x, attention_mask, is_causal)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert module.prefix.embedding.weight.grad.abs().sum() > 0


def test_prefix_attention_bad_inputs():
    with pytest.raises(ValueError, match="PrefixAttention: embed_dim 10 is not divisible by num_heads 3"):
        PrefixAttention(10, 3, 2)
    module = PrefixAttention(12, 3, 2)
    with pytest.raises(ValueError, match=r"PrefixAttention: x must be \[batch, seq_len, 12\], got \(2, 5, 8\)"):
        module(torch.randn(2, 5, 8))
    with pytest.raises(
        ValueError, match=r"PrefixAttention: attention_mask must be \[batch, seq_len\] = \(2, 5\), got \(2, 4\)"
    ):
        module(torch.randn(2, 5, 12), torch.ones(2, 4))
    with pytest.raises(ValueError, match="PrefixEncoder: num_virtual_tokens must be a positive integer"):
        PrefixAttention(12, 3, 0)


def test_soft_prompt_and_prefix_attention_gradcheck_and_compile_fullgraph():
    from lowrank.nn import SoftPrompt

    torch.manual_seed(0)
    model = nn.Sequential(SoftPrompt(2, 8), PrefixAttention(8, 2, 3, projection_dim=4)).double()
    x = torch.randn(2, 4, 8, dtype=torch.float64, requires_grad=True)
    prompt_params = [model[0].weight, *model[1].prefix.parameters()]  # the trained ones
    assert torch.autograd.gradcheck(lambda x, *params: model(x), (x, *prompt_params))
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-10, atol=1e-10)


def test_own_model_with_prefix_attention_trains_and_saves_only_prefixes(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(PrefixAttention(8, 2, 3), nn.GELU(), PrefixAttention(8, 2, 3, projection_dim=4))
    mark_only_prompt_trainable(model)
    trainable = sorted(name for name, p in model.named_parameters() if p.requires_grad)
    assert trainable == [
        "0.prefix.embedding.weight",
        "2.prefix.embedding.weight",
        "2.prefix.transform.0.bias",
        "2.prefix.transform.0.weight",
        "2.prefix.transform.2.bias",
        "2.prefix.transform.2.weight",
    ]
    save_prompt(model, tmp_path)
    from safetensors.torch import load_file

    assert sorted(load_file(tmp_path / "prompt_model.safetensors")) == trainable
    x = torch.randn(2, 4, 8)
    expected = model(x)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.zero_()
    load_prompt(model, tmp_path)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


# ---- the prefix-tuning wrapper on Hugging Face models ----------------------------------------


def prefix_from_cache(encoder: PrefixEncoder, cache) -> None:
    """Set the prefix to the keys/values a model cached for real tokens ([1, heads, n, head_dim] per layer)."""
    flat = torch.stack(
        [torch.stack((layer.keys[0], layer.values[0])) for layer in cache.layers]
    )  # [layers, 2, heads, n, head_dim]
    with torch.no_grad():
        encoder.embedding.weight.copy_(flat.permute(3, 0, 1, 2, 4).reshape(encoder.num_virtual_tokens, -1))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_decoder_prefix_equals_running_the_model_on_the_prefix_tokens(tiny_model, family):
    """A prefix holding the model's own keys/values for tokens p makes it see [p, x], positions included."""
    model = tiny_model(family)
    wrapped = prefix_tuning(copy.deepcopy(model), 4)
    prefix_ids = torch.tensor([[7, 3, 42, 9]])
    with torch.no_grad():
        prefix_from_cache(wrapped.prefix, model(input_ids=prefix_ids, use_cache=True).cache)
        input_ids, attention_mask = batch()
        out = first_output(wrapped(input_ids=input_ids, attention_mask=attention_mask))
        full_ids = torch.cat((prefix_ids.expand(2, 4), input_ids), 1)
        full_mask = torch.cat((torch.ones(2, 4, dtype=torch.long), attention_mask), 1)
        expected = first_output(model(input_ids=full_ids, attention_mask=full_mask))[:, 4:]
    assert out.shape == (2, 5, VOCAB)
    real = attention_mask.bool()
    torch.testing.assert_close(out[real], expected[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_padding_does_not_leak_into_real_tokens(tiny_model, family):
    model = prefix_tuning(tiny_model(family), 3)
    input_ids, attention_mask = batch()
    with torch.no_grad():
        padded = first_output(model(input_ids=input_ids, attention_mask=attention_mask))[1, :3]
        alone = first_output(model(input_ids=input_ids[1:, :3]))[0]
        base = first_output(model.model(input_ids=input_ids[1:, :3]))[0]
    torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-5)
    assert (alone - base).abs().max() > 1e-2  # the prefix does something


@pytest.mark.parametrize("projection_dim", [None, 16])
@pytest.mark.parametrize("family", FAMILIES)
def test_outputs_match_peft_prefix_tuning(tiny_model, family, projection_dim):
    peft = pytest.importorskip("peft")
    model = tiny_model(family)
    wrapped = prefix_tuning(copy.deepcopy(model), 3, projection_dim=projection_dim)
    config = peft.PrefixTuningConfig(
        task_type="FEATURE_EXTRACTION" if family == "bert" else "CAUSAL_LM", num_virtual_tokens=3,
        prefix_projection=projection_dim is not None, encoder_hidden_size=projection_dim or DIM,
    )  # fmt: skip
    peft_model = peft.get_peft_model(copy.deepcopy(model), config)
    peft_model.prompt_encoder["default"].load_state_dict(wrapped.prefix.state_dict())
    input_ids, attention_mask = batch()
    with torch.no_grad():
        ours = first_output(wrapped(input_ids=input_ids, attention_mask=attention_mask))
        theirs = first_output(peft_model(input_ids=input_ids, attention_mask=attention_mask))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_task_head_without_cache_argument_gets_prefixes_in_its_backbone():
    """BertForSequenceClassification takes no cache (PEFT 0.21.2 raises on it under transformers 5); its
    backbone gets the prefixes, so it computes the head on the prefix-tuned BertModel."""
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=DIM, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=MAX_POSITIONS, num_labels=3,
    )  # fmt: skip
    model = transformers.BertForSequenceClassification(config).eval()
    wrapped = prefix_tuning(copy.deepcopy(model), 3)
    backbone = PrefixTuningModel(copy.deepcopy(model.bert), wrapped.prefix)
    input_ids, attention_mask = batch()
    labels = torch.tensor([0, 2])
    with torch.no_grad():
        ours = wrapped(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        expected = model.classifier(backbone(input_ids=input_ids, attention_mask=attention_mask).pooler_output)
        base = model(input_ids=input_ids, attention_mask=attention_mask)
    torch.testing.assert_close(ours.logits, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.loss, nn.functional.cross_entropy(expected, labels), rtol=1e-5, atol=1e-6)
    assert (ours.logits - base.logits).abs().max() > 1e-3


def test_prefix_wrapper_bad_inputs(tiny_model):
    model = tiny_model("gpt2")
    wrapped = prefix_tuning(model, 4)
    input_ids, attention_mask = batch()
    with pytest.raises(
        ValueError,
        match=r"PrefixTuningModel: 4 virtual tokens \+ 21 input tokens = 25 positions.*max_position_embeddings=24",
    ):
        wrapped(input_ids=torch.zeros(1, 21, dtype=torch.long))
    with pytest.raises(
        ValueError, match=r"PrefixTuningModel: attention_mask must be \[batch, seq_len\] = \(2, 5\), got \(5,\)"
    ):
        wrapped(input_ids=input_ids, attention_mask=attention_mask[0])
    with pytest.raises(ValueError, match=r"PrefixTuningModel: input_ids must be \[batch, seq_len\], got \(5,\)"):
        wrapped(input_ids=input_ids[0])
    with pytest.raises(ValueError, match="PrefixTuningModel: a past_key_values .* is not supported"):
        wrapped(input_ids=input_ids, past_key_values=transformers.DynamicCache())
    with pytest.raises(
        ValueError,
        match=r"PrefixTuningModel: the prefix encoder is \(num_layers, num_heads, head_dim\) = \(3, 4, 8\), "
        r"but GPT2LMHeadModel needs \(2, 4, 8\)",
    ):
        PrefixTuningModel(model, PrefixEncoder(4, 3, 4, 8))
    distilbert = transformers.DistilBertModel(
        transformers.DistilBertConfig(vocab_size=VOCAB, dim=DIM, n_layers=1, n_heads=4, hidden_dim=37)
    )
    with pytest.raises(ValueError, match=r"prefix_tuning: DistilBertModel \(distilbert\) takes no key/value cache"):
        prefix_tuning(distilbert, 4)
    with pytest.raises(ValueError, match="PrefixTuningModel: expected a Hugging Face transformers model, got Linear"):
        PrefixTuningModel(nn.Linear(4, 4), PrefixEncoder(4, 1, 1, 4))


def test_save_and_load_only_the_prefix(tiny_model, tmp_path):
    wrapped = prefix_tuning(tiny_model("llama"), 3, projection_dim=8)
    save_prompt(wrapped, tmp_path)
    from safetensors.torch import load_file

    assert all(key.startswith("prefix.") for key in load_file(tmp_path / "prompt_model.safetensors"))
    other = prefix_tuning(tiny_model("llama"), 3, projection_dim=8)
    nn.init.zeros_(other.prefix.embedding.weight)
    load_prompt(other, tmp_path)
    for (name, mine), theirs in zip(wrapped.prefix.state_dict().items(), other.prefix.state_dict().values()):
        assert torch.equal(mine, theirs), name
    with pytest.raises(ValueError, match=r"load_prompt: prompt module 'prefix' was saved as .*'projection_dim': 8"):
        load_prompt(prefix_tuning(tiny_model("llama"), 3), tmp_path)
    with pytest.raises(FileNotFoundError, match="load_prompt: no prompt_config.json"):
        load_prompt(other, tmp_path / "missing")


# ---- the real all-MiniLM-L6-v2 ----------------------------------------------------------------


def test_minilm_prompt_tuning_trains_only_the_prompt(minilm, trains_only_what_it_should):
    base, tokenizer, batch = minilm
    n = 5
    wrapped = prompt_tuning(copy.deepcopy(base), n, init="text", init_text="Represent the topic:", tokenizer=tokenizer)
    assert [name for name, p in wrapped.named_parameters() if p.requires_grad] == ["prompt.weight"]
    tokens = batch["input_ids"].shape[1]

    def embed():
        hidden = wrapped(**batch).last_hidden_state
        assert hidden.shape == (3, n + tokens, 384)
        mask = batch["attention_mask"].unsqueeze(-1).float()  # mean over the real tokens
        return (hidden[:, n:] * mask).sum(1) / mask.sum(1)

    target = nn.functional.normalize(torch.randn(3, 384, generator=torch.Generator().manual_seed(0)), dim=-1)
    trains_only_what_it_should(
        wrapped, lambda: 1 - nn.functional.cosine_similarity(embed(), target).mean(), [wrapped.prompt.weight],
        lr=0.05, optimizer=torch.optim.Adam,
    )  # fmt: skip


@pytest.mark.parametrize("projection_dim", [None, 32])
def test_minilm_prefix_tuning_trains_only_the_prefix(minilm, trains_only_what_it_should, projection_dim):
    base, _, batch = minilm
    wrapped = prefix_tuning(copy.deepcopy(base), 5, projection_dim=projection_dim)
    assert (wrapped.prefix.num_layers, wrapped.prefix.num_heads, wrapped.prefix.head_dim) == (6, 12, 32)
    assert all(name.startswith("prefix.") for name, p in wrapped.named_parameters() if p.requires_grad)

    def embed():
        hidden = wrapped(**batch).last_hidden_state
        assert hidden.shape == (*batch["input_ids"].shape, 384)
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return (hidden * mask).sum(1) / mask.sum(1)

    target = nn.functional.normalize(torch.randn(3, 384, generator=torch.Generator().manual_seed(0)), dim=-1)
    trains_only_what_it_should(
        wrapped, lambda: 1 - nn.functional.cosine_similarity(embed(), target).mean(), wrapped.prefix.parameters(),
        lr=0.02, optimizer=torch.optim.Adam,
    )  # fmt: skip
