"""Front end, patches, positions and masking (docs/METHOD.md §1 and §2)."""

import math

import pytest
import torch

from msm_lightning.model.frontend import LogMelFrontend
from msm_lightning.model.masking import random_mask
from msm_lightning.model.msm import MaskedSpectrogramModel
from msm_lightning.model.patching import PatchEmbed, patchify, sincos_2d, unpatchify


def test_log_mel_shape_and_normalisation():
    fe = LogMelFrontend()
    spec = fe(torch.randn(3, 32000))
    assert spec.shape == (3, 1, 201, 80)  # 10 ms hop, centred frames
    flat = spec.flatten(1)
    torch.testing.assert_close(flat.mean(1), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(flat.std(1), torch.ones(3), atol=1e-4, rtol=0)


def test_log_mel_tone_lands_in_the_right_band():
    fe = LogMelFrontend()
    t = torch.arange(16000) / 16000
    low = fe.log_mel(torch.sin(2 * math.pi * 200 * t)[None])
    high = fe.log_mel(torch.sin(2 * math.pi * 4000 * t)[None])
    assert low.mean(1).argmax() < high.mean(1).argmax()


def test_frontend_rejects_wrong_rank():
    with pytest.raises(ValueError, match="batch, samples"):
        LogMelFrontend()(torch.randn(32000))


@pytest.mark.parametrize("patch", [(4, 16), (4, 8), (8, 16)])
def test_patchify_round_trip_and_time_major_order(patch):
    spec = torch.randn(2, 1, 200, 80)
    p = patchify(spec, patch)
    gt, gf = 200 // patch[0], 80 // patch[1]
    assert p.shape == (2, gt * gf, patch[0] * patch[1])
    torch.testing.assert_close(unpatchify(p, patch, (gt, gf)), spec)
    # Patch k = (time step k // gf, frequency band k % gf): the first gf patches are time step 0.
    k = gf + 2
    expected = spec[0, 0, patch[0] : 2 * patch[0], 2 * patch[1] : 3 * patch[1]].reshape(-1)
    torch.testing.assert_close(p[0, k], expected)


def test_patch_embed_is_a_linear_map_of_patchify():
    embed = PatchEmbed((4, 16), 32)
    spec = torch.randn(2, 1, 200, 80)
    direct = patchify(spec, (4, 16)) @ embed.proj.weight.view(32, -1).t() + embed.proj.bias
    torch.testing.assert_close(embed(spec), direct, atol=1e-5, rtol=1e-5)


def test_indivisible_spectrogram_is_a_clear_error():
    with pytest.raises(ValueError, match="not divisible"):
        patchify(torch.randn(1, 1, 201, 80), (4, 16))


def test_sincos_2d_distinguishes_every_position_and_splits_axes():
    pos = sincos_2d((50, 5), 192)
    assert pos.shape == (250, 192)
    assert torch.cdist(pos, pos).add(torch.eye(250) * 1e3).min() > 1e-3
    # First half depends on time only: patches 0..4 share time step 0.
    torch.testing.assert_close(pos[0, :96], pos[4, :96])
    assert not torch.allclose(pos[0, 96:], pos[4, 96:])


def test_mask_has_exactly_half_per_sample_and_varies():
    mask = random_mask(16, 250, 0.5)
    assert mask.dtype == torch.bool
    assert (mask.sum(1) == 125).all()
    assert not (mask[0] == mask[1]).all()
    assert (random_mask(4, 251, 0.5).sum(1) == round(0.5 * 251)).all()


def test_mask_is_uniform_over_positions():
    freq = random_mask(4000, 10, 0.3).float().mean(0)
    torch.testing.assert_close(freq, torch.full((10,), 0.3), atol=0.03, rtol=0)


def test_masked_tokens_keep_their_position():
    model = MaskedSpectrogramModel.from_preset("transformer", "tiny")
    spec = torch.randn(1, 1, 200, 80)
    mask = torch.ones(1, 250, dtype=torch.bool)
    tokens = model.embed(spec, mask)
    assert tokens.shape == (1, 251, 192)
    # Every masked token is the mask token plus its own position, so no two are equal.
    masked = tokens[0, 1:]
    torch.testing.assert_close(masked - model.pos_embed, model.mask_token[0].expand(250, -1))
    assert torch.cdist(masked, masked).add(torch.eye(250) * 1e3).min() > 1e-3


def test_unmasked_patches_do_not_enter_the_loss():
    """The loss's gradient w.r.t. the predicted patches is exactly zero at visible patches."""
    torch.manual_seed(0)
    model = MaskedSpectrogramModel.from_preset("transformer", "tiny", depth=2).eval()
    spec = torch.randn(2, 1, 200, 80)
    mask = random_mask(2, 250, 0.5)
    preds: list[torch.Tensor] = []
    model.head.register_forward_hook(lambda module, args, out: out.retain_grad() or preds.append(out))
    loss = model.masked_loss(spec, mask)
    loss.backward()
    grad = preds[0].grad  # [batch, n_patches, pt * pf]
    assert torch.count_nonzero(grad[~mask]) == 0
    assert bool((grad[mask].abs().sum(-1) > 0).all())
    all_patches = ((preds[0] - patchify(spec, (4, 16))) ** 2).mean()
    assert not torch.isclose(loss, all_patches)


def test_loud_float_audio_does_not_overflow_the_front_end():
    # Finite samples near 1e30 (a broken float WAV) overflow a float32 power spectrum; the result must be
    # finite and, the level being removed by the normalisation, that of the same clip at a normal level.
    fe = LogMelFrontend()
    quiet = 0.1 * torch.randn(2, 16000, generator=torch.Generator().manual_seed(0))
    loud = torch.cat([quiet[:1] * 1e30, quiet[1:]])
    spec = fe(loud)
    assert torch.isfinite(spec).all()
    torch.testing.assert_close(spec, fe(quiet), atol=1e-3, rtol=0)
    assert torch.equal(spec[1], fe(quiet[1:])[0])  # the normal clip is computed as before


def test_silent_and_constant_clips_normalise_the_same_in_any_batch():
    fe = LogMelFrontend()
    noise = 0.1 * torch.randn(3, 16000, generator=torch.Generator().manual_seed(1))
    for clip in (torch.zeros(16000), torch.full((16000,), 0.3)):
        alone = fe(clip[None])[0]
        batched = fe(torch.cat([noise[:1], clip[None], noise[1:]]))[1]
        assert torch.equal(alone, batched)
        assert alone.abs().max() < 1e-3  # no magnified rounding noise
    # Near-silence is damped by the floor rather than blown up to unit variance.
    assert fe(1e-6 * noise).flatten(1).std(1).max() < 0.1
    # Above the floor, the released models' standardisation (x - mean) / (std + 1e-8) is unchanged.
    log_mel = fe.log_mel(noise)
    dims = (1, 2)
    reference = (log_mel - log_mel.mean(dims, keepdim=True)) / (log_mel.std(dims, keepdim=True) + 1e-8)
    torch.testing.assert_close(fe(noise)[:, 0], reference, atol=1e-5, rtol=0)


def test_a_silent_clips_embedding_does_not_depend_on_its_batch():
    from msm_lightning.hear.encoder import HearModel, random_model

    model = HearModel(random_model("transformer"))
    silent = torch.zeros(1, 16000)
    other = 0.1 * torch.randn(2, 16000, generator=torch.Generator().manual_seed(2))
    alone = model.scene_embeddings(silent)
    together = model.scene_embeddings(torch.cat([other[:1], silent, other[1:]]))[1:2]
    torch.testing.assert_close(together, alone, atol=1e-6, rtol=1e-5)
