"""Prompt tuning: SoftPrompt on its own, PromptTuningModel on tiny random BERT / GPT-2 / Llama (no
downloads) and on the real all-MiniLM-L6-v2, against the model run on the prompt's tokens and against PEFT."""

import copy
import functools
import os

import pytest
import torch
from torch import nn

from lowrank import PromptTuningModel, load_prompt, prompt_tuning, save_prompt
from lowrank.nn import SoftPrompt

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


# ---- Hugging Face wrapper ----------------------------------------------------------------------


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


def test_wrapper_bad_inputs(tiny_model):
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
