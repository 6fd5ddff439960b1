"""Interop with code we did not write: the official checkpoint layout and diffusers' DiT."""

import warnings

import pytest
import torch
from diffusers import DDPMScheduler, DiTPipeline, DiTTransformer2DModel
from helpers.tiny import randomize, tiny_diffusers_dit, tiny_dit, tiny_vae

from dit.hub.convert import from_diffusers, infer_official_config, load_official_checkpoint, to_diffusers
from dit.models import DiTConfig, create_model


def official_xl2_shapes():
    """Keys and shapes of the released DiT-XL-2-256x256.pt (facebookresearch/DiT models.py)."""
    D, p, C = 1152, 2, 4
    shapes = {
        "pos_embed": (1, 256, D),
        "x_embedder.proj.weight": (D, C, p, p),
        "x_embedder.proj.bias": (D,),
        "t_embedder.mlp.0.weight": (D, 256),
        "t_embedder.mlp.0.bias": (D,),
        "t_embedder.mlp.2.weight": (D, D),
        "t_embedder.mlp.2.bias": (D,),
        "y_embedder.embedding_table.weight": (1001, D),
        "final_layer.linear.weight": (p * p * 2 * C, D),
        "final_layer.linear.bias": (p * p * 2 * C,),
        "final_layer.adaLN_modulation.1.weight": (2 * D, D),
        "final_layer.adaLN_modulation.1.bias": (2 * D,),
    }
    for i in range(28):
        b = f"blocks.{i}."
        shapes |= {
            b + "attn.qkv.weight": (3 * D, D),
            b + "attn.qkv.bias": (3 * D,),
            b + "attn.proj.weight": (D, D),
            b + "attn.proj.bias": (D,),
            b + "mlp.fc1.weight": (4 * D, D),
            b + "mlp.fc1.bias": (4 * D,),
            b + "mlp.fc2.weight": (D, 4 * D),
            b + "mlp.fc2.bias": (D,),
            b + "adaLN_modulation.1.weight": (6 * D, D),
            b + "adaLN_modulation.1.bias": (6 * D,),
        }
    return shapes


def test_state_dict_layout_is_the_official_one():
    with torch.device("meta"):
        model = create_model("DiT-XL/2", block="adaln_zero", input_size=32, in_channels=4, num_classes=1000)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == official_xl2_shapes()
    xl2 = dict(patch_size=2, hidden_size=1152, depth=28, num_heads=16)  # the paper's Table 1
    data = dict(input_size=32, in_channels=4, num_classes=1000)  # ImageNet 256 latents
    expected = DiTConfig(**xl2, **data, class_dropout_prob=0.1, learn_sigma=True, block="adaln_zero", name="DiT-XL/2")
    assert infer_official_config(model.state_dict()) == expected


def random_model(freq_shift=0, num_classes=10):
    model = tiny_dit(patch_size=2, in_channels=4, num_classes=num_classes, timestep_freq_shift=freq_shift)
    return randomize(model, 0.2).eval()


def batch():
    return torch.randn(4, 4, 16, 16), torch.randint(0, 1000, (4,)), torch.tensor([0, 3, 9, 10])


@pytest.mark.parametrize("wrapped", [False, True])
def test_official_checkpoint_loads_strictly_and_without_pickle(tmp_path, wrapped):
    model = random_model()
    sd = model.state_dict()
    path = tmp_path / "DiT-Debug-2.pt"
    # train.py of the official repo saves {"model", "ema", "opt", "args"}; released files are plain state dicts.
    torch.save({"model": sd, "ema": sd, "opt": {}} if wrapped else sd, path)
    loaded = load_official_checkpoint(path).eval()
    assert loaded.name == "DiT-Debug/2" and loaded.num_classes == 10
    with torch.no_grad():
        x, t, y = batch()
        torch.testing.assert_close(loaded(x, t, y), model(x, t, y), rtol=0, atol=0)


@pytest.mark.parametrize("freq_shift", [0, 1])
def test_to_diffusers_gives_the_same_outputs(freq_shift):
    model = random_model(freq_shift)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dmodel = to_diffusers(model).eval()
    x, t, y = batch()
    with torch.no_grad():
        diff = (dmodel(x, t, y).sample - model(x, t, y)).abs().max().item()
    assert diff <= 1e-5


def test_from_diffusers_gives_the_same_outputs():
    dmodel = randomize(tiny_diffusers_dit(), 0.2)
    emb = dmodel.transformer_blocks[0].norm1.emb.state_dict()
    for block in dmodel.transformer_blocks[1:]:  # a converted model shares its embedders
        block.norm1.emb.load_state_dict(emb)
    model = from_diffusers(dmodel.eval())
    assert model.t_embedder.freq_shift == 1
    x, t, y = batch()
    with torch.no_grad():
        assert (model(x, t, y) - dmodel(x, t, y).sample).abs().max().item() <= 1e-5
    # ... and back again.
    back = to_diffusers(model).eval()
    for k, v in dmodel.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v, rtol=0, atol=0, msg=k)


def test_from_diffusers_refuses_unshared_embedders():
    dmodel = tiny_diffusers_dit()
    with pytest.raises(ValueError, match="transformer_blocks.1 has timestep/label embedders"):
        from_diffusers(dmodel)


def test_to_diffusers_refuses_other_blocks():
    with pytest.raises(ValueError, match="only has adaLN-Zero blocks, not 'cross_attn'"):
        to_diffusers(tiny_dit("cross_attn", 2, in_channels=4))


def test_saved_diffusers_model_runs_in_dit_pipeline(tmp_path):
    # diffusers' own timestep embedding, so the reload is exact too; DiTPipeline hard-codes the
    # null class as 1000, so it only runs 1000-class models.
    model = random_model(freq_shift=1, num_classes=1000)
    to_diffusers(model).save_pretrained(tmp_path / "transformer")
    transformer = DiTTransformer2DModel.from_pretrained(tmp_path / "transformer").eval()
    x, t, y = batch()
    with torch.no_grad():
        assert (transformer(x, t, y).sample - model(x, t, y)).abs().max().item() <= 1e-5
    vae = tiny_vae()
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=DDPMScheduler(num_train_timesteps=1000))
    out = pipe(
        class_labels=[1, 7],
        num_inference_steps=2,
        guidance_scale=4.0,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    )
    assert out.images.shape == (2, 32, 32, 3)
