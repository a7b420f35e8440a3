"""ADMUNetModel and ADMClassifierModel: the call conventions of UNet2DModel (raw timesteps in any form, class
labels), timestep rescaling inside the model, attention against a plain einsum reference in both q|k|v orders,
the attention pool against the full-token computation, channels-last / half precision / gradient
checkpointing, config validation and the save/load round trip."""

from __future__ import annotations

import math

import pytest
import torch

from ddpm_plus.models.adm_blocks import ADMAttentionBlock, ADMAttentionPool, timestep_embedding
from ddpm_plus.models.adm_classifier import POOLS, ADMClassifierModel
from ddpm_plus.models.adm_unet import ADMUNetModel

TINY = dict(sample_size=16, model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,))


def randomised(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (zero-initialised ones included), scaled so activations stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            std = 1 / math.sqrt(math.prod(p.shape[1:])) if p.ndim > 1 else 0.2
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def unet(**kw) -> ADMUNetModel:
    return randomised(ADMUNetModel(**{**TINY, **kw}))


def test_timestep_forms_agree_and_bad_shapes_fail():
    model = unet(learn_sigma=True)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        ref = model(x, torch.tensor([7, 7, 7])).sample
        for t in (7, 7.0, torch.tensor(7), torch.tensor([7])):
            torch.testing.assert_close(model(x, t).sample, ref, rtol=0, atol=0)
        assert model(x, 7, return_dict=False)[0].shape == (3, 6, 16, 16)
    with pytest.raises(ValueError, match="one value per image"):
        model(x, torch.tensor([1, 2]))


def test_rescaled_timesteps_are_t_times_1000_over_T():
    plain = unet()
    rescaled = ADMUNetModel(**TINY, rescale_timesteps=True, num_train_timesteps=4000)
    rescaled.load_state_dict(plain.state_dict())
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 3999])
    with torch.no_grad():
        torch.testing.assert_close(rescaled(x, t).sample, plain(x, t.float() * 0.25).sample, rtol=0, atol=0)


def test_timestep_embedding_is_cos_then_sin():
    emb = timestep_embedding(torch.tensor([0.0, 10.0]), 8)
    freqs = torch.exp(-math.log(10000) * torch.arange(4) / 4)
    torch.testing.assert_close(emb[1], torch.cat([torch.cos(10 * freqs), torch.sin(10 * freqs)]))
    assert timestep_embedding(torch.tensor([1.0]), 7).shape == (1, 7)


def test_class_labels():
    model = unet(num_class_embeds=10)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        a = model(x, 5, class_labels=torch.tensor([4, 4])).sample
        torch.testing.assert_close(model(x, 5, class_labels=torch.tensor([4])).sample, a, rtol=0, atol=0)
        assert not torch.allclose(model(x, 5, class_labels=torch.tensor([4, 5])).sample, a)
    with pytest.raises(ValueError, match="class-conditional"):
        model(x, 5)
    with pytest.raises(ValueError, match="unconditional"):
        unet()(x, 5, class_labels=torch.tensor([1, 2]))


def reference_attention(x, norm, qkv_w, qkv_b, proj_w, proj_b, heads, new_order):
    """The attention block written out with einsum on (B, C, L), heads split as the checkpoints split them."""
    b, c, h, w = x.shape
    qkv = torch.einsum("oc,bcl->bol", qkv_w[..., 0], norm(x).reshape(b, c, -1)) + qkv_b[None, :, None]
    ch = c // heads
    if new_order:
        q, k, v = (t.reshape(b * heads, ch, -1) for t in qkv.chunk(3, dim=1))
    else:
        q, k, v = qkv.reshape(b * heads, 3 * ch, -1).split(ch, dim=1)
    weight = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(ch), dim=-1)
    a = torch.einsum("bts,bcs->bct", weight, v).reshape(b, c, -1)
    out = torch.einsum("oc,bcl->bol", proj_w[..., 0], a) + proj_b[None, :, None]
    return x + out.reshape(b, c, h, w)


@pytest.mark.parametrize("new_order", [False, True])
@pytest.mark.parametrize("heads", [1, 4])
def test_attention_block_matches_einsum_reference(new_order, heads):
    block = randomised(ADMAttentionBlock(64, heads, new_order)).double()
    x = torch.randn(2, 64, 5, 7, dtype=torch.float64)
    ref = reference_attention(
        x, block.norm, block.qkv.weight, block.qkv.bias, block.proj_out.weight, block.proj_out.bias, heads, new_order
    )
    with torch.no_grad():
        torch.testing.assert_close(block(x), ref, rtol=1e-12, atol=1e-12)
        cl = block(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(cl, ref, rtol=1e-12, atol=1e-12)


def test_attention_pool_matches_full_token_computation():
    pool = randomised(ADMAttentionPool(4, 128, 64, 10)).double()
    x = torch.randn(2, 128, 4, 4, dtype=torch.float64)
    tokens = x.flatten(2)
    tokens = torch.cat([tokens.mean(-1, keepdim=True), tokens], -1) + pool.positional_embedding
    qkv = torch.einsum("oc,bcl->bol", pool.qkv_proj.weight[..., 0], tokens) + pool.qkv_proj.bias[None, :, None]
    q, k, v = (t.reshape(2 * 2, 64, -1) for t in qkv.chunk(3, dim=1))  # q|k|v split before the 2 heads
    weight = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / 8.0, dim=-1)
    a = torch.einsum("bts,bcs->bct", weight, v).reshape(2, 128, -1)
    ref = torch.einsum("oc,bcl->bol", pool.c_proj.weight[..., 0], a)[:, :, 0] + pool.c_proj.bias
    with torch.no_grad():
        torch.testing.assert_close(pool(x), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("pool", POOLS)
def test_classifier_pools(pool):
    model = randomised(
        ADMClassifierModel(sample_size=16, model_channels=64, channel_mult=(1, 2), num_res_blocks=1, pool=pool)
    )
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        logits = model(x, torch.tensor([0, 999]))
        torch.testing.assert_close(model(x, 0), model(x, torch.tensor([0, 0])), rtol=0, atol=0)
    assert logits.shape == (2, 1000) and torch.isfinite(logits).all()


def test_channels_last_half_precision_and_checkpointing():
    model = unet(num_heads=2, use_new_attention_order=True, resblock_updown=True, learn_sigma=True)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = model(x, 10).sample
        cl = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last), 10).sample
        torch.testing.assert_close(cl, ref, rtol=1e-5, atol=1e-5)
        half = torch.nn.Module.to(
            unet(num_heads=2, use_new_attention_order=True, resblock_updown=True, learn_sigma=True), torch.bfloat16
        )
        out = half(x.bfloat16(), 10).sample
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0.1, atol=0.1)

    model = unet(dropout=0.0).train()
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        if checkpointing:
            model.enable_gradient_checkpointing()
        model(x, 10).sample.square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def test_config_validation():
    with pytest.raises(ValueError, match="num_head_channels=48 does not divide"):
        ADMUNetModel(**TINY, num_head_channels=48)
    with pytest.raises(ValueError, match="num_heads=3"):
        ADMUNetModel(**TINY, num_heads=3)
    with pytest.raises(ValueError, match="class_embed_type"):
        ADMUNetModel(**TINY, class_embed_type="timestep")
    with pytest.raises(ValueError, match="learn_sigma"):
        ADMUNetModel(**TINY, learn_sigma=True, out_channels=3)
    with pytest.raises(ValueError, match="pool"):
        ADMClassifierModel(sample_size=16, model_channels=64, channel_mult=(1, 2), pool="max")
    assert ADMUNetModel(**TINY, learn_sigma=True).config.out_channels == 6


def test_save_and_load_round_trip(tmp_path):
    model = unet(num_class_embeds=3, learn_sigma=True, rescale_timesteps=True, num_train_timesteps=4000)
    model.save_pretrained(tmp_path / "unet")
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = ADMUNetModel.from_pretrained(tmp_path / "unet").eval()
    public = [{k: v for k, v in c.items() if not k.startswith("_")} for c in (loaded.config, model.config)]
    assert public[0] == public[1]
    x, labels = torch.randn(1, 3, 16, 16), torch.tensor([2])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, 9, labels).sample, model(x, 9, labels).sample, rtol=1e-5, atol=1e-6)
