"""The learned modules: sizes from configs, the mapper's structure, save/load of the learned folder."""

import pytest
import torch

from gill_pipeline import GILLMapper, GILLModel


def test_mapper_reference_structure():
    mapper = GILLMapper(in_dim=64, out_dim=48, num_output_tokens=77)
    names = {n.split(".")[0] for n, _ in mapper.named_parameters()}
    assert names == {"fc", "tfm", "model", "query_embs"}  # the reference's parameter names
    assert mapper.query_embs.shape == (1, 77, 512)
    assert len(mapper.tfm.encoder.layers) == 4 and len(mapper.tfm.decoder.layers) == 4
    layer = mapper.tfm.encoder.layers[0]
    assert layer.norm_first and layer.self_attn.num_heads == 4 and layer.linear1.out_features == 2048
    h, e = torch.randn(3, 8, 64), torch.randn(3, 8, 64)
    out = mapper.eval()(h, e)
    assert out.shape == (3, 77, 48)
    # The input embeddings are ADDED to the hidden states: swapping them changes nothing.
    torch.testing.assert_close(mapper(e, h), out, atol=1e-5, rtol=1e-5)


def test_mapper_rejects_bad_sizes():
    with pytest.raises(ValueError, match=r"`hidden_dim` \(30\) must be divisible by `num_heads` \(4\)"):
        GILLMapper(in_dim=8, out_dim=8, hidden_dim=30)
    with pytest.raises(ValueError, match=r"`out_dim` must be a positive integer, got 0"):
        GILLMapper(in_dim=8, out_dim=0)
    mapper = GILLMapper(in_dim=8, out_dim=8, hidden_dim=16, num_heads=2)
    with pytest.raises(ValueError, match=r"must have the same shape"):
        mapper(torch.randn(1, 4, 8), torch.randn(1, 3, 8))


def small_model(**kwargs):
    config = dict(lm_input_dim=24, lm_hidden_dim=24, vision_dim=20, cond_dim=12, cond_length=9, num_img_tokens=5,
                  num_visual_tokens=3, retrieval_dim=7, mapper_hidden_dim=16, mapper_heads=2,
                  mapper_encoder_layers=1, mapper_decoder_layers=1)
    config.update(kwargs)
    return GILLModel(**config).eval()


def test_every_size_comes_from_the_config():
    model = small_model()
    assert model.img_input_embeddings.shape == (5, 24)
    assert model.img_output_embeddings is None and model.img_output_rows is model.img_input_embeddings
    assert model.encode_visual_prefix(torch.randn(2, 20)).shape == (2, 3, 24)
    text = model.text_retrieval_embeds(torch.randn(2, 24))
    image = model.image_retrieval_embeds(torch.randn(2, 20))
    assert text.shape == image.shape == (2, 7)
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(2))
    assert model.map_to_prompt_embeds(torch.randn(2, 5, 24)).shape == (2, 9, 12)
    probs = model.decide(torch.randn(4, 24))
    assert probs.shape == (4, 2)
    torch.testing.assert_close(probs.sum(-1), torch.ones(4))
    assert model.uncond_prompt_embeds.shape == (1, 9, 12)
    assert model.img_logits(torch.randn(3, 24)).shape == (3, 5)
    assert abs(model.temperature - 0.07) < 1e-6


def test_untied_model_has_output_rows():
    model = small_model(tie_img_embeddings=False)
    assert model.img_output_embeddings.shape == (5, 24)
    h = torch.randn(2, 24)
    torch.testing.assert_close(model.img_logits(h), h @ model.img_output_embeddings.t())


def test_widths_must_agree():
    with pytest.raises(ValueError, match=r"`lm_input_dim`=24 and `lm_hidden_dim`=32"):
        small_model(lm_hidden_dim=32)


def test_learned_folder_round_trip(tmp_path):
    model = small_model(tie_img_embeddings=False)
    model.uncond_prompt_embeds.normal_()
    model.save_pretrained(tmp_path)
    loaded = GILLModel.from_pretrained(tmp_path).eval()
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert loaded.config.num_img_tokens == 5 and loaded.config.tie_img_embeddings is False


def test_img_rows_start_from_lm_statistics():
    model = small_model()
    table = torch.randn(100, 24) * 3 + 5
    model.init_img_embeddings_from(table)
    assert (model.img_input_embeddings.mean(0) - table.mean(0)).abs().max() < 1.0
