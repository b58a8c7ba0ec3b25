"""PPD's user branch (t2i_align/conditioning/users.py): exact no-op at init and at scale 0, gradients only into the
branch, and a saved branch that plain diffusers' `pipe.load_ip_adapter` loads to the same outputs."""

import pytest
import torch
from safetensors.torch import save_file

from helpers import one_torch_thread, tiny_sd15_pipeline, tiny_sdxl_pipeline  # noqa: F401
from t2i_align.conditioning import users as ub

USER_DIM, NUM_TOKENS = 24, 5
BUILDERS = {"sd15": tiny_sd15_pipeline, "sdxl": tiny_sdxl_pipeline}


def _toy_unet():
    from diffusers import UNet2DConditionModel

    from t2i_align.toy.assets import pipeline_dir

    return UNet2DConditionModel.from_pretrained(str(pipeline_dir()), subfolder="unet")


def _unet(family):
    return _toy_unet() if family == "toy" else BUILDERS[family]().unet


def _inputs(unet, batch=2, seed=1):
    """(sample, timestep, text states, family added cond, user tokens) for one UNet call."""
    g = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    x = torch.randn(batch, 4, size, size, generator=g)
    h = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g)
    added = {}
    if unet.config.addition_embed_type == "text_time":
        added = {"text_embeds": torch.randn(batch, 32, generator=g), "time_ids": torch.randn(batch, 6, generator=g)}
    return x, torch.tensor([10, 700][:batch]), h, added, torch.randn(batch, NUM_TOKENS, USER_DIM, generator=g)


def _run(unet, inputs, user=True, tokens=None):
    x, t, h, added, user_tokens = inputs
    cond = dict(added)
    if user:
        cond.update(ub.user_added_cond(user_tokens if tokens is None else tokens, unet))
    return unet(x, t, h, added_cond_kwargs=cond).sample


def _perturb(params, seed=3, size=0.05):
    """A few manual non-zero updates, as training would make."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(size * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("family", ["sd15", "sdxl", "toy"])
def test_branch_is_bit_for_bit_base_at_init_and_at_scale_zero(family):
    unet = _unet(family)
    inputs = _inputs(unet)
    with torch.no_grad():
        base = _run(unet, inputs, user=False)
        params = ub.add_user_branch(unet, USER_DIM, NUM_TOKENS)
        assert torch.equal(_run(unet, inputs), base)  # to_v_ip = 0 adds exactly 0.0
        _perturb(params)
        trained = _run(unet, inputs)
        with ub.user_branch_disabled(unet):
            assert torch.equal(_run(unet, inputs), base)
        ub.set_user_scale(unet, 0.0)
        assert torch.equal(_run(unet, inputs), base)
    assert not torch.allclose(trained, base, atol=1e-4)


def test_zero_user_vector_is_not_the_base_once_trained():
    """The trap: after training, a zero embedding still produces tokens (biases, LayerNorm), so "no user" must be
    scale 0, not zeros."""
    unet = _unet("sd15")
    inputs = _inputs(unet)
    with torch.no_grad():
        base = _run(unet, inputs, user=False)
        _perturb(ub.add_user_branch(unet, USER_DIM, NUM_TOKENS))
        zero_user = _run(unet, inputs, tokens=torch.zeros(2, NUM_TOKENS, USER_DIM))
        with ub.user_branch_disabled(unet):
            off = _run(unet, inputs, tokens=torch.zeros(2, NUM_TOKENS, USER_DIM))
    assert (zero_user - base).abs().max() > 1e-3
    assert torch.equal(off, base)


def test_parameters_and_init_layout():
    unet = _unet("sd15")
    params = ub.add_user_branch(unet, USER_DIM, NUM_TOKENS)
    # tiny SD1.5: 4 cross-attention layers (down 1, mid 1, up 2) x (to_k_ip, to_v_ip) + projection (3 x w, b)
    assert len(params) == 4 * 2 + 6
    state = ub.user_branch_state_dict(unet)
    assert sorted(k for k in state if k.startswith("image_proj.")) == [
        f"image_proj.proj.{i}.{w}" for i in (0, 2, 3) for w in ("bias", "weight")]
    assert sorted(k for k in state if k.startswith("ip_adapter.")) == [
        f"ip_adapter.{i}.to_{kv}_ip.weight" for i in (1, 3, 5, 7) for kv in ("k", "v")]
    assert state["image_proj.proj.0.weight"].shape == (USER_DIM, USER_DIM)  # FeedForward mult=1: D -> D -> 32
    assert state["image_proj.proj.2.weight"].shape == (32, USER_DIM)
    first = unet.get_submodule("down_blocks.1.attentions.0.transformer_blocks.0.attn2")
    assert torch.equal(state["ip_adapter.1.to_k_ip.weight"], first.to_k.weight)  # IP-Adapter's init
    assert all(not state[f"ip_adapter.{i}.to_v_ip.weight"].any() for i in (1, 3, 5, 7))


def _loss_and_grads(unet, params, inputs):
    for p in params:
        p.grad = None
    _run(unet, inputs).square().mean().backward()
    return [p.grad for p in params]


def test_gradients_reach_only_the_branch():
    unet = _unet("sd15")
    unet.requires_grad_(False)
    params = ub.add_user_branch(unet, USER_DIM, NUM_TOKENS)
    inputs = _inputs(unet)
    v_ids = {id(attn.processor.to_v_ip[0].weight) for _, attn in ub._cross_attention_layers(unet)}
    grads = _loss_and_grads(unet, params, inputs)
    # At init V' = 0, so the output does not depend on K' or on the projected tokens: only to_v_ip moves first.
    for p, g in zip(params, grads):
        assert (g.abs().sum() > 0) == (id(p) in v_ids)
    _perturb([p for p in params if id(p) in v_ids])
    grads = _loss_and_grads(unet, params, inputs)
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    branch = {id(p) for p in params}
    assert all(p.grad is None for p in unet.parameters() if id(p) not in branch)
    assert {id(p) for p in unet.parameters() if p.requires_grad} == branch


def test_branch_restricted_to_blocks_trains_only_there_and_the_rest_stays_a_no_op():
    unet = _toy_unet()
    unet.requires_grad_(False)
    inputs = _inputs(unet)
    with torch.no_grad():
        base = _run(unet, inputs, user=False)
    ub.add_user_branch(unet, USER_DIM, NUM_TOKENS)
    params = ub.restrict_user_branch(unet, ["up_blocks.1"])
    layers = ub._cross_attention_layers(unet)
    chosen = [attn for name, attn in layers if name.startswith("up_blocks.1")]
    assert len(chosen) == 2 and len(layers) == 7  # the toy UNet: up_blocks.1 has 2 of its 7 cross-attentions
    expected = list(unet.encoder_hid_proj.parameters()) + [p for a in chosen for p in a.processor.parameters()]
    assert [id(p) for p in params] == [id(p) for p in expected]
    assert {id(p) for p in unet.parameters() if p.requires_grad} == {id(p) for p in params}
    _perturb(params)
    with torch.no_grad():
        assert not torch.allclose(_run(unet, inputs), base, atol=1e-4)
        for attn in chosen:  # the other layers' to_v_ip is still zero: with these off too, it is the base
            attn.processor.to_v_ip[0].weight.zero_()
        assert torch.equal(_run(unet, inputs), base)
    with pytest.raises(ub.UserBranchError, match=r"\['up_blocks.9'\] match no cross-attention layer.*mid_block"):
        ub.restrict_user_branch(unet, ["up_blocks.9"])


def _pipeline_latents(pipe, tokens, **kwargs):
    out = pipe(["a cat", "a photo of a cat"], num_inference_steps=2, guidance_scale=3.0, output_type="latent",
               generator=torch.Generator().manual_seed(0), height=16, width=16, **kwargs)
    return out.images


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_saved_branch_loads_in_plain_diffusers_with_the_same_outputs(family, tmp_path):
    ours = BUILDERS[family]()
    params = ub.add_user_branch(ours.unet, USER_DIM, NUM_TOKENS)
    _perturb(params)
    path = ub.save_user_branch(tmp_path, ours.unet)
    assert path == tmp_path / ub.USER_WEIGHT_NAME
    tokens = _inputs(ours.unet)[-1]
    embeds = ub.pipeline_user_embeds(tokens)
    theirs = BUILDERS[family]()
    theirs.load_ip_adapter(str(tmp_path), subfolder="", weight_name=ub.USER_WEIGHT_NAME, image_encoder_folder=None)
    with torch.no_grad():
        assert torch.equal(_pipeline_latents(theirs, tokens, ip_adapter_image_embeds=embeds),
                           _pipeline_latents(ours, tokens, ip_adapter_image_embeds=embeds))
        theirs.set_ip_adapter_scale(0.5)
        ub.set_user_scale(ours.unet, 0.5)
        half = _pipeline_latents(ours, tokens, ip_adapter_image_embeds=embeds)
        assert torch.equal(_pipeline_latents(theirs, tokens, ip_adapter_image_embeds=embeds), half)
        theirs.set_ip_adapter_scale(0.0)
        base = _pipeline_latents(BUILDERS[family](), tokens)
        assert torch.equal(_pipeline_latents(theirs, tokens, ip_adapter_image_embeds=embeds), base)
        # the fp16 table `users embed` writes, in an fp32 pipeline: diffusers does not cast (a dtype error)
        theirs.set_ip_adapter_scale(0.5)
        fp16 = tokens.half()
        with pytest.raises(RuntimeError, match="dtype"):
            _pipeline_latents(theirs, tokens, ip_adapter_image_embeds=ub.pipeline_user_embeds(fp16))
        cast = _pipeline_latents(theirs, tokens, ip_adapter_image_embeds=ub.pipeline_user_embeds(fp16,
                                                                                                 dtype=torch.float32))
        torch.testing.assert_close(cast, half, atol=1e-2, rtol=1e-2)  # the tokens' fp16 rounding only
    assert (half - base).abs().max() > 1e-4  # the equalities above compared a branch that acts


def test_our_loader_restores_weights_scale_and_outputs(tmp_path):
    unet = _unet("sdxl")
    _perturb(ub.add_user_branch(unet, USER_DIM, NUM_TOKENS, scale=0.7))
    ub.save_user_branch(tmp_path, unet)
    state, meta = ub.read_user_branch(tmp_path / ub.USER_WEIGHT_NAME)
    assert (meta["user_dim"], meta["num_tokens"], meta["cross_attention_dim"], meta["layers"]) == (24, 5, 64, 8)
    assert meta["scale"] == 0.7
    fresh = _unet("sdxl")
    params = ub.load_user_branch(fresh, tmp_path)
    assert len(params) == 8 * 2 + 6 and all(p.requires_grad for p in params)
    assert ub.get_user_scale(fresh) == 0.7
    loaded = ub.user_branch_state_dict(fresh)
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    inputs = _inputs(unet)
    with torch.no_grad():
        assert torch.equal(_run(fresh, inputs), _run(unet, inputs))


def test_remove_restores_the_plain_unet():
    unet = _unet("sd15")
    inputs = _inputs(unet)
    with torch.no_grad():
        base = _run(unet, inputs, user=False)
        _perturb(ub.add_user_branch(unet, USER_DIM, NUM_TOKENS))
        ub.remove_user_branch(unet)
        assert not ub.has_user_branch(unet) and unet.encoder_hid_proj is None
        assert torch.equal(_run(unet, inputs, user=False), base)


def test_disabled_block_restores_the_previous_scale():
    unet = _unet("sd15")
    ub.add_user_branch(unet, USER_DIM, NUM_TOKENS, scale=0.7)
    with ub.user_branch_disabled(unet):
        assert ub.get_user_scale(unet) == 0.0
    assert ub.get_user_scale(unet) == 0.7


def test_lora_leaves_the_branch_alone_and_every_adapter_off_is_the_base():
    """The reference "base" = LoRA disabled and the user branch at scale 0; peft must not wrap to_k_ip."""
    from peft import LoraConfig

    unet = _unet("sd15")
    inputs = _inputs(unet)
    with torch.no_grad():
        base = _run(unet, inputs, user=False)
        _perturb(ub.add_user_branch(unet, USER_DIM, NUM_TOKENS))
        unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian",
                                    target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
        assert not any("lora" in n for n, _ in unet.named_parameters() if "_ip." in n or "encoder_hid_proj" in n)
        _perturb([p for n, p in unet.named_parameters() if "lora_B" in n])
        assert not torch.allclose(_run(unet, inputs), base, atol=1e-4)
        unet.disable_adapters()
        with ub.user_branch_disabled(unet):
            assert torch.equal(_run(unet, inputs), base)


def test_user_added_cond_layout_and_shape_errors():
    unet = _unet("sd15")
    tokens = torch.randn(3, NUM_TOKENS, USER_DIM)
    cond = ub.user_added_cond(tokens)
    assert list(cond) == ["image_embeds"] and len(cond["image_embeds"]) == 1
    assert cond["image_embeds"][0].shape == (3, 1, NUM_TOKENS, USER_DIM)
    with pytest.raises(ValueError, match="batch dimension"):
        ub.user_added_cond(tokens[0])
    with pytest.raises(ub.UserBranchError, match="has no user branch"):
        ub.user_added_cond(tokens, unet)
    ub.add_user_branch(unet, USER_DIM, NUM_TOKENS)
    with pytest.raises(ValueError, match=r"takes \[batch, 5, 24\]"):
        ub.user_added_cond(torch.randn(3, NUM_TOKENS, 7), unet)
    neg = torch.zeros_like(tokens)
    assert torch.equal(ub.pipeline_user_embeds(tokens, neg)[0][:, 0], torch.cat([neg, tokens]))
    assert torch.equal(ub.pipeline_user_embeds(tokens, do_classifier_free_guidance=False)[0][:, 0], tokens)


def test_add_and_load_errors(tmp_path):
    unet = _unet("sd15")
    with pytest.raises(ub.UserBranchError, match="has no user branch"):
        ub.save_user_branch(tmp_path, unet)
    with pytest.raises(FileNotFoundError, match="save_user_branch"):
        ub.load_user_branch(unet, tmp_path)
    ub.add_user_branch(unet, USER_DIM, NUM_TOKENS)
    with pytest.raises(ub.UserBranchError, match="already has an encoder_hid_proj"):
        ub.add_user_branch(unet, USER_DIM, NUM_TOKENS)
    ub.save_user_branch(tmp_path / "sd15", unet)
    with pytest.raises(ub.UserBranchError, match="does not fit this UNet"):
        ub.load_user_branch(_unet("sdxl"), tmp_path / "sd15")  # 32-wide cross-attention into a 64-wide UNet
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / ub.USER_WEIGHT_NAME).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ub.UserBranchError, match="not a readable safetensors file"):
        ub.load_user_branch(_unet("sd15"), tmp_path / "bad")
    save_file({"image_proj.proj.0.weight": torch.zeros(2, 2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ub.UserBranchError, match="pipe.load_ip_adapter"):
        ub.load_user_branch(_unet("sd15"), tmp_path, weight_name="foreign.safetensors")



def test_classic_processor_gets_its_ip_sibling_and_unknown_ones_are_refused():
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    unet = _unet("sd15")
    unet.set_attn_processor(AttnProcessor())  # torch < 2.0 style attention, e.g. chosen for debugging
    inputs = _inputs(unet)
    with torch.no_grad():
        base = _run(unet, inputs, user=False)
        ub.add_user_branch(unet, USER_DIM, NUM_TOKENS)
        names = {type(p).__name__ for p in unet.attn_processors.values()}
        assert names == {"AttnProcessor", "IPAdapterAttnProcessor"} and torch.equal(_run(unet, inputs), base)
    ub.remove_user_branch(unet)
    assert {type(p).__name__ for p in unet.attn_processors.values()} == {"AttnProcessor"}

    class CustomProcessor(AttnProcessor2_0):
        pass

    unet.set_attn_processor(CustomProcessor())
    with pytest.raises(ub.UserBranchError, match="uses CustomProcessor; .*set the attention backend"):
        ub.add_user_branch(unet, USER_DIM, NUM_TOKENS)
