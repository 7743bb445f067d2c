"""The decoding copy with fused projections decodes as the model does and follows its weights."""

import pytest
import torch
from conftest import prompts
from transformers import GenerationConfig

from rlvr import fused_decode, load_model
from rlvr.fused_decode import FusedInputs
from rlvr.surgery import enable_fast_rollouts, expand_model
from rlvr.vocab import ReasoningVocab

STOP = {"eos_token_id": [151645, 151643], "pad_token_id": 151643}


def qwen3():
    model, _ = load_model("tiny-qwen3", reasoning_vocab_size=8)
    return model


def llama(qwen_tok, factory):
    model = factory(seed=2)
    return expand_model(model, ReasoningVocab.for_tokenizer(qwen_tok, len(qwen_tok), 8))


@pytest.fixture(params=["qwen3", "llama"])
def model(request, qwen_tok, tiny_llama_factory):
    return qwen3() if request.param == "qwen3" else llama(qwen_tok, tiny_llama_factory)


def decode(model, tokenizer, **options):
    config = GenerationConfig(max_new_tokens=12, **{"do_sample": False, **STOP, **options})
    return model.generate(**prompts(tokenizer, 5), generation_config=config)


def test_the_fused_copy_decodes_as_the_model_does(model, qwen_tok):
    reference = type(model).generate(
        model, **prompts(qwen_tok, 5), generation_config=GenerationConfig(max_new_tokens=12, **STOP)
    )
    enable_fast_rollouts(model, compile=False, own_copy=True)  # an fp32 copy: comparable token for token
    out = decode(model, qwen_tok)
    twin = model.fast_rollout._shadow
    fused = [m for m in twin.modules() if isinstance(m, FusedInputs)]
    assert len(fused) == 2 * model.config.num_hidden_layers  # attention and MLP inputs in every layer
    assert not any(name.endswith(("q_proj", "up_proj")) for name, _ in twin.named_parameters())
    assert torch.equal(out, reference)


def test_the_fused_copy_scores_sampled_tokens_as_the_unfused_one(qwen_tok, monkeypatch):
    outputs = []
    for fusable in (fused_decode.FUSABLE, {}):
        monkeypatch.setattr(fused_decode, "FUSABLE", fusable)
        model = qwen3()
        enable_fast_rollouts(model, compile=False, own_copy=True)
        model.record_sampling_logprobs = True
        torch.manual_seed(0)
        out = decode(model, qwen_tok, do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
        outputs.append((out, model.sampling_logprobs))
    assert torch.equal(outputs[0][0], outputs[1][0])
    torch.testing.assert_close(outputs[0][1], outputs[1][1], atol=1e-5, rtol=1e-5)


def test_each_rollout_decodes_with_the_models_current_weights(model, qwen_tok):
    enable_fast_rollouts(model, compile=False, dtype=torch.bfloat16)
    decode(model, qwen_tok)
    with torch.no_grad():  # an optimizer step's worth of change to every weight
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    decode(model, qwen_tok)
    twin = model.fast_rollout._shadow
    targets = fused_decode.decode_targets(twin)
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(targets[name], parameter.to(torch.bfloat16), msg=name)
    layer = twin.model.layers[0]
    assert isinstance(layer.self_attn, FusedInputs) and isinstance(layer.mlp, FusedInputs)
    attention = model.model.layers[0].self_attn
    expected = torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight])
    torch.testing.assert_close(layer.self_attn.weight, expected.to(torch.bfloat16))


def test_the_copys_head_is_padded_to_whole_rows_that_no_draw_reaches(model, qwen_tok):
    enable_fast_rollouts(model, compile=False, own_copy=True)
    sampled = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
    decode(model, qwen_tok, **sampled)
    twin = model.fast_rollout._shadow
    weight = model.get_output_embeddings().weight
    head = twin.get_output_embeddings().weight
    rows = weight.shape[0]
    whole = fused_decode.HEAD_ROWS
    assert rows % whole and head.shape[0] == -(-rows // whole) * whole
    assert fused_decode.logit_rows(twin) == head.shape[0]
    assert torch.equal(head[:rows], weight) and not head[rows:].any()
    if model.config.tie_word_embeddings:  # one storage, filled once per rollout
        assert twin.get_input_embeddings().weight.data_ptr() == head.data_ptr()
    with torch.no_grad():  # rows past the vocabulary that would win every draw were they not forbidden
        head[rows:] = 50 * torch.randn_like(head[rows:])
    torch.manual_seed(0)
    out = decode(model, qwen_tok, **sampled)
    assert int(out.max()) < rows
    assert torch.equal(head[:rows], weight)  # the refresh wrote the vocabulary's rows, and only those
