"""Named LoRA adapters, rsLoRA, PiSSA, DoRA, mixed batches and PEFT's multi-adapter directories, against HF
PEFT 0.21 on tiny BERT, GPT-2 and Llama models: equal outputs both ways."""

import contextlib
import copy
import json
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file

import lowrank
from lowrank import (
    active_adapters,
    adapter_batch,
    add_weighted_adapter,
    delete_adapter,
    disable_adapters,
    inject_lora,
    load_lora,
    mark_only_lora_trainable,
    merge_and_unload_lora,
    merge_lora,
    save_lora,
    set_adapter,
)
from lowrank.tuners.lora.model import lora_layers

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

BACKEND = "torch"
CLOSE = dict(rtol=1e-5, atol=1e-5)

# family: (targets of "default", targets of "other"), "other" overlapping "default" on one kind of module
TARGETS = {
    "bert": (["query", "value"], ["value", "intermediate.dense"]),
    "gpt2": (["c_attn"], ["c_attn", "mlp.c_fc"]),
    "llama": (["q_proj", "v_proj"], ["v_proj", "down_proj"]),
}
FAMILIES = list(TARGETS)


def hidden(model, ids):
    return model(ids).last_hidden_state


def randomize(model, seed=1):
    """Nonzero values for every LoRA tensor (so that each adapter changes the output)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def peft_with_two_adapters(base, family):
    """A PEFT model with "default" (r=4, alpha=8) and "other" (r=2, alpha=4, rsLoRA), randomized."""
    default_targets, other_targets = TARGETS[family]
    conv1d = {"fan_in_fan_out": family == "gpt2"}
    model = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=default_targets, **conv1d)
    )
    other = peft.LoraConfig(r=2, lora_alpha=4, target_modules=other_targets, use_rslora=True, **conv1d)
    model.add_adapter("other", other)
    randomize(model)
    return model.eval()


ACTIVE_SETS = ["default", "other", ["default", "other"]]


def assert_same_outputs(peft_model, ours, ids, active_sets=ACTIVE_SETS):
    for active in active_sets:
        peft_model.base_model.set_adapter(active)
        set_adapter(ours, active)
        torch.testing.assert_close(hidden(ours, ids), hidden(peft_model, ids), **CLOSE, msg=str(active))


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_directory_with_two_adapters_loads_with_equal_outputs(tiny_hf_model, family, tmp_path):
    base = tiny_hf_model(family)
    peft_model = peft_with_two_adapters(base, family)
    peft_model.save_pretrained(tmp_path)
    assert os.path.isfile(tmp_path / "other" / "adapter_config.json")  # PEFT's layout: the others in sub-folders

    ours = load_lora(copy.deepcopy(base), tmp_path, backend=BACKEND)
    load_lora(ours, tmp_path, adapter_name="other")
    assert active_adapters(ours) == ["default"]  # a later adapter joins inactive, as PEFT's load_adapter
    assert sorted(ours.lora_configs) == ["default", "other"] and ours.lora_configs["other"].use_rslora
    ids = torch.randint(0, 40, (2, 6))
    assert_same_outputs(peft_model, ours, ids)
    with peft_model.disable_adapter(), disable_adapters(ours):
        torch.testing.assert_close(hidden(ours, ids), hidden(base, ids), **CLOSE)
    torch.testing.assert_close(hidden(ours, ids), hidden(peft_model, ids), **CLOSE)  # enabled again on exit


@pytest.mark.parametrize("family", FAMILIES)
def test_our_two_adapters_load_in_peft_with_equal_outputs(tiny_hf_model, family, tmp_path):
    base = tiny_hf_model(family)
    default_targets, other_targets = TARGETS[family]
    ours = inject_lora(copy.deepcopy(base), default_targets, r=4, alpha=8, backend=BACKEND)
    inject_lora(ours, other_targets, r=2, alpha=4, adapter_name="other", use_rslora=True, backend=BACKEND)
    randomize(ours)
    save_lora(ours, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors", "other"]
    assert json.loads((tmp_path / "other" / "adapter_config.json").read_text())["use_rslora"] is True

    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    peft_model.load_adapter(tmp_path, adapter_name="other", subfolder="other")
    assert_same_outputs(peft_model, ours, torch.randint(0, 40, (2, 6)))


@pytest.mark.parametrize("combination_type", ["linear", "cat", "svd"])
@pytest.mark.parametrize("family", FAMILIES)
def test_add_weighted_adapter_matches_peft(tiny_hf_model, family, combination_type, tmp_path):
    base = tiny_hf_model(family)
    peft_model = peft_with_two_adapters(base, family)
    if combination_type == "linear":  # needs one rank: a second r=4 adapter instead of "other"
        peft_model.delete_adapter("other")
        peft_model.add_adapter("other", peft.LoraConfig(
            r=4, lora_alpha=2, target_modules=TARGETS[family][1], fan_in_fan_out=family == "gpt2"))  # fmt: skip
        randomize(peft_model, seed=2)
    peft_model.save_pretrained(tmp_path)
    ours = load_lora(copy.deepcopy(base), tmp_path, backend=BACKEND)
    load_lora(ours, tmp_path, adapter_name="other")

    args = (["default", "other"], [0.7, -0.4], "mix")
    peft_model.base_model.add_weighted_adapter(*args, combination_type=combination_type)
    add_weighted_adapter(ours, *args, combination_type=combination_type)
    assert active_adapters(ours) == ["default"]
    assert not any(p.requires_grad for n, p in ours.named_parameters() if n.endswith("_mix"))  # frozen, as PEFT
    assert_same_outputs(peft_model, ours, torch.randint(0, 40, (2, 6)), ["mix"])
    with pytest.raises(ValueError, match="already has an adapter 'mix'"):
        add_weighted_adapter(ours, *args, combination_type=combination_type)


def test_add_weighted_adapter_of_rslora_adapters_is_the_weighted_sum(tiny_hf_model):
    """PEFT 0.21 scales such a combination by √r (it keeps use_rslora while setting alpha = r); ours is exact."""
    model = inject_lora(tiny_hf_model("llama"), ["q_proj"], r=4, alpha=8, use_rslora=True, backend=BACKEND)
    randomize(model)
    add_weighted_adapter(model, ["default"], [0.5], "half", combination_type="cat")
    layer = model.layers[0].self_attn.q_proj
    torch.testing.assert_close(layer.delta_weight("half"), 0.5 * layer.delta_weight("default"))


def test_delete_adapter_like_peft(tiny_hf_model, tmp_path):
    base = tiny_hf_model("llama")
    peft_model = peft_with_two_adapters(base, "llama")
    peft_model.save_pretrained(tmp_path)
    ours = load_lora(copy.deepcopy(base), tmp_path, backend=BACKEND)
    load_lora(ours, tmp_path, adapter_name="other")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.delete_adapter("default")
    with pytest.warns(UserWarning, match="'default' was the active one; 'other' is active now"):
        delete_adapter(ours, "default")
    assert active_adapters(ours) == ["other"] and list(ours.lora_configs) == ["other"]
    assert not any(".lora_A" in key and not key.endswith("_other") for key in ours.state_dict())
    ids = torch.randint(0, 40, (2, 6))
    # (PeftModel's own forward wants its "default" config back: call the LoraModel under it)
    torch.testing.assert_close(hidden(ours, ids), hidden(peft_model.base_model, ids), **CLOSE)
    with pytest.raises(ValueError, match=r"no LoRA adapter\(s\) \['default'\]"):
        set_adapter(ours, "default")


def test_mark_only_lora_trainable_trains_only_the_active_adapter(tiny_hf_model, trains_only_what_it_should):
    model = inject_lora(tiny_hf_model("llama"), ["q_proj", "v_proj"], r=4, backend=BACKEND)
    inject_lora(model, ["v_proj", "o_proj"], r=2, adapter_name="task", backend=BACKEND)
    set_adapter(model, "task")
    mark_only_lora_trainable(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"layers.{i}.self_attn.{m}.lora_{ab}_task" for i in (0, 1) for m in ("v_proj", "o_proj") for ab in "AB"
    }
    ids = torch.randint(0, 40, (2, 6))
    trains_only_what_it_should(model, lambda: hidden(model, ids).square().mean(), trainable)


def test_set_adapter_unmerges_and_disable_adapters_remerges(tiny_hf_model):
    model = inject_lora(tiny_hf_model("bert"), ["query"], r=4, backend=BACKEND)
    inject_lora(model, ["query"], r=2, adapter_name="other", backend=BACKEND)
    randomize(model)
    ids = torch.randint(0, 40, (2, 6))
    expected = hidden(model, ids)
    merge_lora(model)
    with disable_adapters(model):
        assert not any(layer.merged for layer in lora_layers(model).values())
        base_output = hidden(model, ids)
    assert all(layer.merged_adapters == ["default"] for layer in lora_layers(model).values())
    torch.testing.assert_close(hidden(model, ids), expected, **CLOSE)
    set_adapter(model, "other")
    assert not any(layer.merged for layer in lora_layers(model).values())
    with disable_adapters(model):
        torch.testing.assert_close(hidden(model, ids), base_output)


# ------------------------------------------------------------------ PiSSA


@pytest.mark.parametrize("family", FAMILIES)
def test_pissa_init_equals_peft_and_saves_as_lora_on_the_original_base(tiny_hf_model, family, tmp_path):
    base = tiny_hf_model(family)
    targets = TARGETS[family][0]
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, init_lora_weights="pissa", fan_in_fan_out=family == "gpt2"
    )
    peft_model = peft.get_peft_model(copy.deepcopy(base), config)
    ours = inject_lora(copy.deepcopy(base), targets, r=4, alpha=8, init_lora_weights="pissa", backend=BACKEND)
    peft_state = peft_model.state_dict()
    for name, layer in lora_layers(ours).items():
        prefix = f"base_model.model.{name}"
        torch.testing.assert_close(layer.lora_A, peft_state[f"{prefix}.lora_A.default.weight"], rtol=0, atol=0)
        torch.testing.assert_close(layer.lora_B, peft_state[f"{prefix}.lora_B.default.weight"], rtol=0, atol=0)
        torch.testing.assert_close(layer.weight, peft_state[f"{prefix}.base_layer.weight"], rtol=0, atol=0)
    ids = torch.randint(0, 40, (2, 6))
    torch.testing.assert_close(hidden(ours, ids), hidden(base, ids), **CLOSE)

    randomize(ours, seed=5)  # "training"
    save_lora(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (8, 16, True)
    on_original = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    torch.testing.assert_close(hidden(on_original, ids), hidden(ours, ids), **CLOSE)
    with disable_adapters(ours):  # the residual weight gets its initial part back: the original model
        torch.testing.assert_close(hidden(ours, ids), hidden(base, ids), **CLOSE)
    merged = merge_and_unload_lora(copy.deepcopy(ours))
    torch.testing.assert_close(hidden(merged, ids), hidden(ours, ids), **CLOSE)


def test_pissa_niter_with_rslora_saves_as_lora_on_the_original_base(tiny_hf_model, tmp_path):
    base = tiny_hf_model("llama")
    ours = inject_lora(
        copy.deepcopy(base), ["q_proj", "down_proj"], r=2, alpha=4, use_rslora=True,
        init_lora_weights="pissa_niter_4", backend=BACKEND,
    )  # fmt: skip
    ids = torch.randint(0, 40, (2, 6))
    torch.testing.assert_close(hidden(ours, ids), hidden(base, ids), **CLOSE)
    randomize(ours, seed=5)
    save_lora(ours, tmp_path)
    on_original = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    torch.testing.assert_close(hidden(on_original, ids), hidden(ours, ids), **CLOSE)
    reloaded = load_lora(copy.deepcopy(base), tmp_path, backend=BACKEND)
    torch.testing.assert_close(hidden(reloaded, ids), hidden(ours, ids), **CLOSE)


def test_peft_pissa_file_loads_onto_the_original_base(tiny_hf_model, tmp_path):
    base = tiny_hf_model("gpt2")
    config = peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["c_attn"], init_lora_weights="pissa", fan_in_fan_out=True
    )
    peft_model = peft.get_peft_model(copy.deepcopy(base), config)
    randomize(peft_model)
    peft_model.save_pretrained(tmp_path / "full")
    ours = load_lora(copy.deepcopy(base), tmp_path / "full", backend=BACKEND)  # residual rebuilt, as PEFT does
    ids = torch.randint(0, 40, (2, 6))
    torch.testing.assert_close(hidden(ours, ids), hidden(peft_model.eval(), ids), **CLOSE)

    config.init_lora_weights = "pissa_niter_2"
    peft.get_peft_model(copy.deepcopy(base), config).save_pretrained(tmp_path / "niter")
    with pytest.raises(ValueError, match="init_lora_weights='pissa_niter_2' is not supported: the randomised SVD"):
        load_lora(copy.deepcopy(base), tmp_path / "niter")


def test_embed_tokens_saved_with_base_layer_weights(tiny_hf_model, tmp_path):
    """PEFT saves a targeted embed_tokens with its base weights; they load into the layer, as in PEFT."""
    base = tiny_hf_model("llama")
    peft_model = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])
    )
    randomize(peft_model)
    with torch.no_grad():  # a base embedding changed after loading (e.g. resized and trained rows)
        peft_model.base_model.model.embed_tokens.base_layer.weight.mul_(1.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Setting save_embedding_layers to True"
        peft_model.save_pretrained(tmp_path)
    assert "base_model.model.embed_tokens.base_layer.weight" in load_file(tmp_path / "adapter_model.safetensors")
    ours = load_lora(copy.deepcopy(base), tmp_path, backend=BACKEND)
    ids = torch.randint(0, 40, (2, 6))
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    torch.testing.assert_close(hidden(ours, ids), hidden(reloaded, ids), **CLOSE)
    torch.testing.assert_close(hidden(ours, ids), hidden(peft_model.eval(), ids), **CLOSE)


# ------------------------------------------------------------------ merged state (issue 17, class 7)


def test_merged_model_state_dict_into_unmerged_model_is_not_applied_twice(tiny_hf_model, tmp_path):
    base = tiny_hf_model("gpt2")
    source = inject_lora(copy.deepcopy(base), ["c_attn", "wte"], r=4, backend=BACKEND)
    randomize(source)
    ids = torch.randint(0, 40, (2, 6))
    expected = hidden(source, ids)
    merge_lora(source)
    torch.save(source.state_dict(), tmp_path / "merged.pt")
    target = inject_lora(copy.deepcopy(base), ["c_attn", "wte"], r=4, backend=BACKEND)
    target.load_state_dict(torch.load(tmp_path / "merged.pt"))
    torch.testing.assert_close(hidden(target, ids), expected, **CLOSE)
    assert all(layer.merged for layer in lora_layers(target).values())
    lowrank.unmerge_lora(target)
    torch.testing.assert_close(hidden(target, ids), expected, **CLOSE)


# ------------------------------------------------------------------ DoRA


def peft_with_dora(base, family):
    """A PEFT model with "default" a DoRA adapter (r=4, alpha=8) and "other" a plain one (r=2, alpha=4, rsLoRA),
    every LoRA tensor randomized and each magnitude moved off the weight norm it starts at."""
    default_targets, other_targets = TARGETS[family]
    conv1d = {"fan_in_fan_out": family == "gpt2"}
    model = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=default_targets, use_dora=True, **conv1d)
    )
    model.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=4, target_modules=other_targets, use_rslora=True,
                                               **conv1d))  # fmt: skip
    randomize_dora(model)
    return model.eval()


def randomize_dora(model, seed=1):
    randomize(model, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.1 * torch.randn(param.shape, generator=generator))


# The base models' own dropout off, so that a training-mode step is deterministic.
NO_DROPOUT = {
    "bert": dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
    "gpt2": dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    "llama": {},
}


def dora_gradients(model, ids):
    """{module name: (dA, dB, dm)} of the DoRA adapter "default" after one training-mode step (dropout 0), for
    a loss linear in the hidden states (BERT's are layer-normed: the mean square would be nearly constant)."""
    model.train()
    model.zero_grad()
    out = hidden(model, ids)
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
    model.eval()
    grads = {}
    for name, module in model.named_modules():
        if isinstance(module, lowrank.nn.LoRALayer) and "default" in module.lora_adapters:
            grads[name] = tuple(p.grad for p in module.adapter_parameters("default"))
        elif "default" in getattr(module, "lora_magnitude_vector", {}):
            grads[name.removeprefix("base_model.model.")] = (
                module.lora_A["default"].weight.grad, module.lora_B["default"].weight.grad,
                module.lora_magnitude_vector["default"].weight.grad,
            )  # fmt: skip
    return grads


# PEFT runs its active adapters in list order, feeding each DoRA adapter the output so far; ours adds the plain
# adapters after the DoRA one, which is PEFT's order with the DoRA adapter first.
DORA_ACTIVE_SETS = ["default", "other", ["default", "other"]]


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_dora_adapter_loads_with_equal_outputs_gradients_and_merge(tiny_hf_model, family, tmp_path):
    base = tiny_hf_model(family, **NO_DROPOUT[family])
    peft_model = peft_with_dora(base, family)
    peft_model.save_pretrained(tmp_path)
    ours = load_lora(copy.deepcopy(base), tmp_path, backend=BACKEND)
    load_lora(ours, tmp_path, adapter_name="other")
    assert ours.lora_configs["default"].use_dora and not ours.lora_configs["other"].use_dora
    ids = torch.randint(0, 40, (2, 6))
    assert_same_outputs(peft_model, ours, ids, DORA_ACTIVE_SETS)
    with peft_model.disable_adapter(), disable_adapters(ours):
        torch.testing.assert_close(hidden(ours, ids), hidden(base, ids), **CLOSE)

    peft_model.base_model.set_adapter("default")
    set_adapter(ours, "default")
    expected, ours_grads = dora_gradients(peft_model, ids), dora_gradients(ours, ids)
    assert sorted(ours_grads) == sorted(expected) and len(ours_grads) >= 2
    for name, grads in ours_grads.items():
        for grad, grad_expected in zip(grads, expected[name], strict=True):
            largest = grad_expected.abs().max()  # (tiny BERT's query gradients are about 1e-4)
            assert largest > 1e-6
            torch.testing.assert_close(grad / largest, grad_expected / largest, **CLOSE, msg=name)

    set_adapter(ours, ["default", "other"])
    peft_model.base_model.set_adapter(["default", "other"])
    expected = hidden(peft_model, ids)
    torch.testing.assert_close(hidden(merge_and_unload_lora(copy.deepcopy(ours)), ids), expected, **CLOSE)
    merge_lora(ours)  # DoRA first, onto the unmerged weight: W' = g ⊙ (W + s·B·A) + the plain delta
    torch.testing.assert_close(hidden(ours, ids), expected, **CLOSE)
    lowrank.unmerge_lora(ours)
    torch.testing.assert_close(hidden(ours, ids), expected, **CLOSE)


@pytest.mark.parametrize("family", FAMILIES)
def test_our_dora_adapter_loads_in_peft_with_equal_outputs(tiny_hf_model, family, tmp_path):
    base = tiny_hf_model(family)
    default_targets, other_targets = TARGETS[family]
    ours = inject_lora(copy.deepcopy(base), default_targets, r=4, alpha=8, use_dora=True, backend=BACKEND)
    inject_lora(ours, other_targets, r=2, alpha=4, adapter_name="other", use_rslora=True, backend=BACKEND)
    randomize_dora(ours)
    save_lora(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    assert json.loads((tmp_path / "other" / "adapter_config.json").read_text())["use_dora"] is False
    name = next(iter(lora_layers(ours)))
    assert f"base_model.model.{name}.lora_magnitude_vector" in load_file(tmp_path / "adapter_model.safetensors")

    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    peft_model.load_adapter(tmp_path, adapter_name="other", subfolder="other")
    assert_same_outputs(peft_model, ours, torch.randint(0, 40, (2, 6)), DORA_ACTIVE_SETS)


def test_dora_trains_a_b_and_the_magnitude(tiny_hf_model, trains_only_what_it_should):
    model = inject_lora(tiny_hf_model("gpt2"), ["c_attn"], r=4, use_dora=True, backend=BACKEND)
    inject_lora(model, ["c_fc"], r=2, adapter_name="plain", backend=BACKEND)
    set_adapter(model, ["default", "plain"])
    mark_only_lora_trainable(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {n.split(".", 2)[-1] for n, p in model.named_parameters() if p.requires_grad} == {
        "attn.c_attn.lora_A", "attn.c_attn.lora_B", "attn.c_attn.lora_magnitude_vector", "mlp.c_fc.lora_A_plain",
        "mlp.c_fc.lora_B_plain",
    }  # fmt: skip
    ids = torch.randint(0, 40, (2, 6))
    trains_only_what_it_should(model, lambda: hidden(model, ids).square().mean(), trainable)
    set_adapter(model, "plain")
    assert not model.h[0].attn.c_attn.lora_magnitude_vector.requires_grad


def test_dora_refusals_leave_the_model_unchanged(tiny_hf_model):
    model = inject_lora(tiny_hf_model("llama"), ["q_proj"], r=4, use_dora=True, backend=BACKEND)
    inject_lora(model, ["q_proj", "v_proj"], r=2, adapter_name="second", use_dora=True, backend=BACKEND)
    with pytest.raises(ValueError, match=r"set_adapter: 'layers.0.self_attn.q_proj': .*one DoRA adapter can be active"):
        set_adapter(model, ["default", "second"])
    assert all(layer.active_adapters == ["default"] for layer in lora_layers(model).values())
    with pytest.raises(ValueError, match=r"DoRA adapters \['default'\] have trained magnitudes"):
        add_weighted_adapter(model, ["default"], [1.0], "mix", combination_type="cat")
    with pytest.raises(ValueError, match="'embed_tokens'.*DoRA is implemented for Linear and Conv1D layers only"):
        inject_lora(model, ["embed_tokens"], r=2, adapter_name="emb", use_dora=True)
    with pytest.raises(ValueError, match="adapter 'second' was injected with use_dora=True"):
        inject_lora(model, ["k_proj"], r=2, adapter_name="second", backend=BACKEND)
    assert "emb" not in lowrank.tuners.lora.model.adapter_names(model)


def test_dora_config_must_match_the_tensors(tiny_hf_model, tmp_path):
    base = tiny_hf_model("bert")
    plain = inject_lora(copy.deepcopy(base), ["query"], r=4, backend=BACKEND)
    save_lora(plain, tmp_path / "plain")
    with pytest.raises(ValueError, match="use_dora=True, but adapter 'default' of .* is not a DoRA adapter"):
        config = json.loads((tmp_path / "plain" / "adapter_config.json").read_text())
        (tmp_path / "plain" / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
        load_lora(plain, tmp_path / "plain")
    with pytest.raises(ValueError, match="missing key 'base_model.model.encoder.layer.0.attention.self.query"
                                         ".lora_magnitude_vector'"):  # fmt: skip
        load_lora(copy.deepcopy(base), tmp_path / "plain")
    (tmp_path / "plain" / "adapter_config.json").write_text(json.dumps({**config, "use_dora": "yes"}))
    with pytest.raises(ValueError, match="use_dora must be true or false, got 'yes'"):
        load_lora(copy.deepcopy(base), tmp_path / "plain")

    dora = inject_lora(copy.deepcopy(base), ["query"], r=4, use_dora=True, backend=BACKEND)
    save_lora(dora, tmp_path / "dora")
    config = json.loads((tmp_path / "dora" / "adapter_config.json").read_text())
    (tmp_path / "dora" / "adapter_config.json").write_text(json.dumps({**config, "use_dora": False}))
    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match="lora_magnitude_vector' is a DoRA magnitude, but the config has use_dora"):
        load_lora(model, tmp_path / "dora")
    assert not lora_layers(model)


# ------------------------------------------------------------------ mixed batches (adapter_batch)

# Every kind of row: each adapter, the base model, and an adapter that some layers lack ("other").
ROW_ADAPTERS = ["other", "__base__", "default", "other", "default"]


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_batch_equals_peft_mixed_batch_inference(tiny_hf_model, family, backend, tmp_path):
    base = tiny_hf_model(family)
    peft_model = peft_with_two_adapters(base, family)
    peft_model.save_pretrained(tmp_path)
    ours = load_lora(copy.deepcopy(base), tmp_path, backend=backend)
    load_lora(ours, tmp_path, adapter_name="other")
    ids = torch.randint(0, 40, (len(ROW_ADAPTERS), 6), generator=torch.Generator().manual_seed(0))
    expected = peft_model(input_ids=ids, adapter_names=ROW_ADAPTERS).last_hidden_state
    with torch.no_grad(), adapter_batch(ours, ROW_ADAPTERS):
        torch.testing.assert_close(hidden(ours, ids), expected, **CLOSE)
    torch.testing.assert_close(hidden(ours, ids), hidden(peft_model, ids), **CLOSE)  # the active adapter again


def test_each_row_equals_its_adapter_alone_on_every_layer_kind():
    """Embedding, Linear and Conv2d (the masked-loop path beside the fused one): a mixed batch's row i is what
    the model gives row i alone with adapter_names[i] active (or with the adapters disabled for "__base__")."""
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"embed": torch.nn.Embedding(12, 6), "linear": torch.nn.Linear(6, 5),
                                 "conv": torch.nn.Conv2d(3, 4, 3, padding=1)})  # fmt: skip

    def forward(ids, image):
        return model["linear"](model["embed"](ids)).sum(1), model["conv"](image).flatten(1)

    inject_lora(model, ["embed", "linear", "conv"], r=3, alpha=6, backend=BACKEND)
    inject_lora(model, ["linear", "conv"], r=2, alpha=2, adapter_name="other")
    randomize(model)
    ids, image = torch.randint(0, 12, (len(ROW_ADAPTERS), 7)), torch.randn(len(ROW_ADAPTERS), 3, 5, 5)
    with torch.no_grad(), adapter_batch(model, ROW_ADAPTERS):
        mixed = forward(ids, image)
    for row, name in enumerate(ROW_ADAPTERS):
        with torch.no_grad(), contextlib.ExitStack() as stack:
            if name == "__base__":
                stack.enter_context(disable_adapters(model))
            else:
                set_adapter(model, name)
            alone = forward(ids[row : row + 1], image[row : row + 1])
        for ours, expected in zip(mixed, alone):
            torch.testing.assert_close(ours[row : row + 1], expected, **CLOSE, msg=f"row {row} ({name})")


def test_adapter_batch_trains_each_adapter_as_alone_on_its_rows(tiny_hf_model, backend):
    """A mixed training batch gives every adapter the gradients of training it alone on its own rows (a loss that
    sums over rows; dropout 0): the fused op's segmented dA, dB and the padding of "other" to rank 4."""
    base = tiny_hf_model("llama")
    ours = inject_lora(copy.deepcopy(base), TARGETS["llama"][0], r=4, alpha=8, backend=backend)
    inject_lora(ours, TARGETS["llama"][1], r=2, alpha=4, adapter_name="other", use_rslora=True, backend=backend)
    randomize(ours)
    mark_only_lora_trainable(set_adapter(ours, ["default", "other"]))  # both adapters trainable, nothing else
    ids = torch.randint(0, 40, (len(ROW_ADAPTERS), 6), generator=torch.Generator().manual_seed(0))
    weights = torch.randn(len(ROW_ADAPTERS), 6, 16, generator=torch.Generator().manual_seed(1))
    ours.train()
    with adapter_batch(ours, ROW_ADAPTERS):
        (hidden(ours, ids) * weights).sum().backward()
    mixed = {name: p.grad.clone() for name, p in ours.named_parameters() if p.grad is not None}
    assert len(mixed) == 2 * (2 * 2 + 2 * 2)  # A and B of both adapters on q, v / v, down in 2 layers
    for adapter in ("default", "other"):
        rows = [row for row, name in enumerate(ROW_ADAPTERS) if name == adapter]
        set_adapter(ours, adapter)
        ours.zero_grad()
        (hidden(ours, ids[rows]) * weights[rows]).sum().backward()
        alone = {name: p.grad for name, p in ours.named_parameters() if p.grad is not None}
        assert alone and all(name.endswith("_other") == (adapter == "other") for name in alone)
        for name, grad in alone.items():
            torch.testing.assert_close(mixed[name], grad, **CLOSE, msg=name)


def test_adapter_batch_refuses_what_peft_refuses_naming_the_problem(tiny_hf_model):
    ours = inject_lora(copy.deepcopy(tiny_hf_model("bert")), ["query", "value"], r=4, alpha=8, backend=BACKEND)
    inject_lora(ours, ["value"], r=2, alpha=4, adapter_name="tuned", use_dora=True)
    ids = torch.randint(0, 40, (2, 6))
    with pytest.raises(ValueError, match=r"adapter_batch: the model has no LoRA adapter\(s\) \['typo'\]"):
        adapter_batch(ours, ["default", "typo"]).__enter__()
    with pytest.raises(TypeError, match="adapter_names must be a list of str"):
        adapter_batch(ours, "default").__enter__()
    with pytest.raises(ValueError, match="encoder.layer.0.attention.self.value.*DoRA adapter 'tuned'"):
        adapter_batch(ours, ["tuned", "default"]).__enter__()
    with pytest.raises(ValueError, match=r"LoRALinear: adapter_batch has 3 adapter names, one per row, but the "
                                         r"layer's input has shape \(2, 6, 16\)"):  # fmt: skip
        with adapter_batch(ours, ["default"] * 3):
            hidden(ours, ids)
    assert all(layer.row_adapters is None for layer in lora_layers(ours).values())  # cleared after the error
    merge_lora(ours)
    with pytest.raises(ValueError, match=r"'encoder.layer.0.attention.self.query'.* merged; unmerge"):
        adapter_batch(ours, ["default", "__base__"]).__enter__()
    pissa = inject_lora(copy.deepcopy(tiny_hf_model("bert")), ["query"], r=2, alpha=4, init_lora_weights="pissa")
    with pytest.raises(ValueError, match="PiSSA adapter 'default'"):
        adapter_batch(pissa, ["default", "default"]).__enter__()


def test_adapter_batch_under_torch_compile_fullgraph_equals_eager():
    """A compiled model inside adapter_batch: the row state is guarded on, so another batch's names or leaving the
    block recompiles rather than reusing a graph built for other rows; outputs and adapter gradients as eager."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Embedding(10, 8), torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4)
    )
    inject_lora(model, ["0", "1", "3"], r=4, alpha=8, backend=BACKEND)
    inject_lora(model, ["0", "1"], r=2, alpha=4, adapter_name="other")
    randomize(model)
    mark_only_lora_trainable(set_adapter(model, ["default", "other"]))
    trained = [p for p in model.parameters() if p.requires_grad]
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randint(0, 10, (len(ROW_ADAPTERS), 3))
    torch._dynamo.reset()
    for names in (ROW_ADAPTERS, ROW_ADAPTERS[::-1], None):
        with adapter_batch(model, names) if names else contextlib.nullcontext():
            results = [(y, torch.autograd.grad(y.square().sum(), trained)) for y in (compiled(x), model(x))]
        (y, grads), (y_eager, grads_eager) = results
        torch.testing.assert_close(y, y_eager, **CLOSE, msg=str(names))
        for grad, grad_eager in zip(grads, grads_eager):
            torch.testing.assert_close(grad, grad_eager, **CLOSE, msg=str(names))
