"""The model is the paper's: checked against the equations written out here in plain tensor math."""

import math

import pytest
import torch

from megapixel.config import ModelConfig, preset
from megapixel.model import IGPT
from megapixel.model.init import materialize
from megapixel.planning.counts import parameter_counts


def small_config(**kw) -> ModelConfig:
    base = dict(n_layer=3, n_embd=32, n_head=4, n_vocab=16, n_px=4)
    base.update(kw)
    return ModelConfig(**base)


def randomised(cfg: ModelConfig, seed: int) -> IGPT:
    """A model whose every weight (zero-initialised heads and unit gains included) is random."""
    torch.manual_seed(seed)
    model = IGPT(cfg).double()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def paper_forward(model: IGPT, tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """openai/image-gpt's model.py, step by step, on the same weights, in float64."""
    cfg = model.cfg
    d, n_head = cfg.n_embd, cfg.n_head
    b, t = tokens.shape

    def norm(x, g):  # "layer norm" without mean subtraction: x * rsqrt(mean(x^2) + 1e-5) * g
        return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + 1e-5) * g

    h = model.wte.weight[tokens]
    if cfg.objective == "ar":
        sos = model.sos.view(1, 1, d).expand(b, 1, d)
        h = torch.cat([sos, h[:, :-1]], dim=1)
    else:
        h = h * (1 - mask.double()).unsqueeze(-1)
    h = h + model.wpe.weight[:t]
    allowed = torch.ones(t, t, dtype=torch.bool)
    if cfg.objective == "ar":
        allowed = torch.tril(allowed)
    for blk in model.blocks:
        x = norm(h, blk.norm1.weight)
        q, k, v = (x @ w.weight.T for w in (blk.attn.q_proj, blk.attn.k_proj, blk.attn.v_proj))
        q, k, v = (y.view(b, t, n_head, d // n_head).permute(0, 2, 1, 3) for y in (q, k, v))
        w = q @ k.transpose(-1, -2) / math.sqrt(d // n_head)
        w = torch.where(allowed, w, torch.tensor(-1e10, dtype=w.dtype))
        a = (torch.softmax(w, dim=-1) @ v).permute(0, 2, 1, 3).reshape(b, t, d)
        h = h + a @ blk.attn.c_proj.weight.T
        x = norm(h, blk.norm2.weight)
        f = x @ blk.mlp.c_fc.weight.T
        f = f * torch.sigmoid(1.702 * f)
        h = h + f @ blk.mlp.c_proj.weight.T
    return norm(h, model.ln_f.weight) @ model.head.weight.T


@pytest.mark.parametrize("objective", ["ar", "bert"])
def test_forward_matches_the_paper_equations(objective):
    model = randomised(small_config(objective=objective), seed=torch.seed() % 2**31)
    tokens = torch.randint(0, 16, (3, 16))
    mask = torch.rand(3, 16) < 0.3 if objective == "bert" else None
    ours = model(tokens, mask).logits
    assert torch.allclose(ours, paper_forward(model, tokens, mask), atol=1e-10, rtol=1e-9)


def test_ar_loss_is_mean_cross_entropy_of_each_token_given_the_ones_before():
    model = randomised(small_config(), seed=1)
    tokens = torch.randint(0, 16, (2, 16))
    logits = paper_forward(model, tokens, None)
    expected = -torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).mean()
    loss, _ = model.loss(tokens)
    assert torch.allclose(loss.double(), expected, rtol=1e-6)
    # Causality: changing the last token leaves every logit unchanged (position i sees tokens < i).
    changed = tokens.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 16
    assert torch.equal(model(tokens).logits, model(changed).logits)


def test_bert_loss_counts_masked_positions_only():
    model = randomised(small_config(objective="bert"), seed=2)
    tokens = torch.randint(0, 16, (2, 16))
    gen = torch.Generator().manual_seed(5)
    loss, _ = model.loss(tokens, generator=gen)
    mask = model.bert_mask(tokens.shape, tokens.device, torch.Generator().manual_seed(5))
    nll = -torch.log_softmax(paper_forward(model, tokens, mask), -1).gather(-1, tokens.unsqueeze(-1))[..., 0]
    assert torch.allclose(loss.double(), nll[mask].mean(), rtol=1e-6)


def test_initialisation_follows_the_reference():
    cfg = ModelConfig(n_layer=4, n_embd=256, n_head=4, n_vocab=512, n_px=16, n_classes=10)
    model = IGPT(cfg)
    blk = model.blocks[0]
    assert blk.attn.q_proj.weight.std().item() == pytest.approx(1 / 16, rel=0.05)
    assert blk.attn.c_proj.weight.std().item() == pytest.approx(1 / math.sqrt(256 * 4), rel=0.05)
    assert blk.mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.wpe.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert torch.count_nonzero(model.head.weight) == 0 and torch.count_nonzero(model.clf.weight) == 0
    assert torch.all(blk.norm1.weight == 1)
    assert not any(name.endswith("bias") for name, _ in model.named_parameters())
    # A zero head predicts the uniform distribution: the first loss is log(vocabulary).
    loss, _ = model.loss(torch.randint(0, 512, (2, 256)))
    assert loss.item() == pytest.approx(math.log(512), rel=1e-6)


def test_a_model_built_on_the_meta_device_and_materialized_equals_one_built_directly():
    cfg = small_config(n_classes=3)
    seed = torch.seed()
    direct = IGPT(cfg)
    torch.manual_seed(seed)
    with torch.device("meta"):
        lazy = IGPT(cfg)
    assert all(p.is_meta for p in lazy.parameters())
    materialize(lazy, "cpu")
    assert lazy.state_dict().keys() == direct.state_dict().keys()
    for name, tensor in direct.state_dict().items():
        assert torch.equal(lazy.state_dict()[name], tensor), name
    assert not torch.equal(IGPT(cfg).wte.weight, direct.wte.weight)  # the next model draws another seed


def test_each_weight_has_its_own_stream_so_a_shard_is_made_without_the_others():
    cfg = small_config()
    torch.manual_seed(0)
    full = IGPT(cfg)
    torch.manual_seed(0)
    with torch.device("meta"):
        lazy = IGPT(cfg)
    # What megapixel.parallel leaves behind: q_proj's rows split two ways (this is rank 1), the rest untouched.
    shard = torch.nn.Parameter(lazy.blocks[1].attn.q_proj.weight.chunk(2, dim=0)[1].clone())
    shard.tensor_model_parallel, shard.partition_dim = True, 0
    lazy.blocks[1].attn.q_proj.weight = shard
    materialize(lazy, "cpu", tensor_rank=1, tensor_size=2, only=lambda name: name.startswith("blocks.1."))
    assert torch.equal(lazy.blocks[1].attn.q_proj.weight, full.blocks[1].attn.q_proj.weight.chunk(2)[1])
    assert lazy.blocks[1].attn.q_proj.weight.partition_dim == 0  # the shard's marks are kept
    assert torch.equal(lazy.blocks[1].mlp.c_fc.weight, full.blocks[1].mlp.c_fc.weight)
    assert lazy.blocks[0].attn.q_proj.weight.is_meta and lazy.wte.weight.is_meta  # not asked for: no memory


def test_classification_head_mean_pools_the_final_normed_states():
    model = randomised(small_config(n_classes=5), seed=3)
    tokens = torch.randint(0, 16, (2, 16))
    h = model.embed(tokens)
    for blk in model.blocks:
        h = blk(h)
    expected = model.ln_f(h).mean(1) @ model.clf.weight.T
    assert torch.allclose(model(tokens).clf_logits, expected)
    total, parts = model.loss(tokens, labels=torch.tensor([1, 4]))
    assert set(parts) == {"gen", "clf"} and torch.allclose(total, parts["gen"] + parts["clf"])


def test_features_are_mean_pooled_normed_attention_inputs_in_the_order_asked():
    model = randomised(small_config(), seed=4)
    tokens = torch.randint(0, 16, (2, 16))
    h, normed = model.embed(tokens), []
    for blk in model.blocks:
        normed.append(blk.norm1(h).mean(1))
        h = blk(h)
    feats = model.features(tokens, [2, 0])
    assert feats.shape == (2, 2 * 32)
    assert torch.allclose(feats.double(), torch.cat([normed[2], normed[0]], -1))
    with pytest.raises(ValueError, match="out of range"):
        model.features(tokens, [3])


def test_kv_cached_decoding_gives_the_full_forward_logits():
    model = randomised(small_config(), seed=5)
    tokens = torch.randint(0, 16, (2, 16))
    full = model(tokens).logits
    caches = model.new_caches(2, torch.float64, torch.device("cpu"))
    prefill = model(tokens[:, :6], caches=caches).logits
    steps = [model.decode_step(tokens[:, t - 1], t, caches) for t in range(6, 16)]
    assert torch.allclose(prefill, full[:, :6]) and torch.allclose(torch.stack(steps, 1), full[:, 6:])


@pytest.mark.parametrize("name, paper_millions", [("s", 76), ("m", 455), ("l", 1362)])
def test_presets_have_the_papers_parameter_counts(name, paper_millions):
    total = sum(parameter_counts(preset(name)).values())
    assert total / 1e6 == pytest.approx(paper_millions, rel=0.01)


def test_parameter_count_from_the_config_equals_the_built_model():
    cfg = preset("tiny")
    cfg.model.n_classes = 10
    assert sum(parameter_counts(cfg).values()) == IGPT(cfg.model).num_parameters()
