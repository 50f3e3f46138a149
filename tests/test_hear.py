"""The HEAR API (msm_lightning.hear, hear_modules.*): shapes, timestamps, true time order, input checks."""

from __future__ import annotations

import importlib
import inspect
import math

import pytest
import torch

from msm_lightning.hear import encoder as hear
from msm_lightning.model.patching import patchify

pytestmark = pytest.mark.filterwarnings("ignore:no model file given:UserWarning")

SR = 16000


@pytest.fixture(scope="module")
def ssast() -> hear.HearModel:
    return hear.load_model(family="transformer")


def tone_burst(onset_s: float, n_samples: int, dur_s: float = 0.4) -> torch.Tensor:
    """Silence with a 1 kHz burst; onsets on the 160-sample frame grid keep the set of frames identical."""
    audio = torch.zeros(n_samples)
    start = round(onset_s * SR)
    t = torch.arange(round(dur_s * SR)) / SR
    audio[start : start + len(t)] = 0.5 * torch.sin(2 * math.pi * 1000 * t)
    return audio


@pytest.mark.parametrize(
    ("module_name", "family", "paper"),
    [("ssast", "transformer", "SSAST"), ("ssam", "mamba", "SSAM"), ("axlstm", "xlstm", "AxLSTM")],
)
def test_modules_expose_the_hear_api_bound_to_their_family(module_name, family, paper):
    module = importlib.import_module(f"hear_modules.{module_name}")
    with pytest.warns(UserWarning, match=f"{paper}-tiny.*RANDOM weights"):
        model = module.load_model()
    assert isinstance(model, torch.nn.Module) and model.model.family == family
    assert (model.sample_rate, model.scene_embedding_size, model.timestamp_embedding_size) == (
        16000,
        960,
        960,
    )
    assert all(type(v) is int for v in (model.sample_rate, model.scene_embedding_size))
    audio = torch.randn(2, 8000) * 0.1
    emb, ts = module.get_timestamp_embeddings(audio, model)
    assert emb.shape == (2, 13, 960) and ts.shape == (2, 13)
    assert module.get_scene_embeddings(audio, model).shape == (2, 960)


def test_random_weights_are_the_same_in_every_load():
    a, b = hear.load_model(family="transformer"), hear.load_model(family="transformer")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("seconds", [0.001, 0.01, 0.0125, 1.0, 2.0, 2.01, 7.3])
@pytest.mark.parametrize("n_sounds", [1, 3])
def test_shapes_dtypes_and_timestamps(ssast, seconds, n_sounds):
    n = round(seconds * SR)
    audio = torch.randn(n_sounds, n) * 0.1
    emb, ts = hear.get_timestamp_embeddings(audio, ssast)
    duration_ms = 1000 * n / SR
    # The centre of each 4-frame patch step (frames at 10 i ms) that lies within the clip, else the
    # clip's centre when it is shorter than the first one.
    expected = torch.tensor(
        [40.0 * t + 15.0 for t in range(n) if 40.0 * t + 15.0 <= duration_ms] or [duration_ms / 2]
    )
    n_steps = len(expected)
    assert emb.shape == (n_sounds, n_steps, 960) and ts.shape == (n_sounds, n_steps)
    assert emb.dtype == ts.dtype == torch.float32 and torch.isfinite(emb).all()
    assert torch.allclose(ts, expected.expand_as(ts))
    assert ts.max() <= duration_ms  # never beyond the audio ...
    assert ts.max() > duration_ms - 40.0  # ... and the last one less than a hop before its end
    assert torch.equal(ts[0].diff(), torch.full((n_steps - 1,), 40.0))  # a regular 40 ms hop throughout
    scene = hear.get_scene_embeddings(audio, ssast)
    assert scene.shape == (n_sounds, 960) and torch.allclose(scene, emb.mean(dim=1), atol=1e-6)


def test_sounds_in_a_batch_are_independent_and_chunking_is_invisible(ssast):
    audio = torch.randn(3, round(4.5 * SR)) * 0.1
    emb, _ = hear.get_timestamp_embeddings(audio, ssast)
    single, _ = hear.get_timestamp_embeddings(audio[1:2], ssast)
    assert torch.allclose(emb[1:2], single, atol=1e-5)
    one_at_a_time = hear.HearModel(ssast.model, chunk_batch=1)  # bounded memory: one 2 s chunk at once
    assert torch.allclose(hear.get_timestamp_embeddings(audio, one_at_a_time)[0], emb, atol=1e-5)


def test_a_minute_of_audio_is_encoded_a_bounded_number_of_chunks_at_a_time(ssast, monkeypatch):
    model = hear.HearModel(ssast.model, chunk_batch=8)
    calls: list[int] = []
    original = ssast.model.forward_features

    def counting(spec: torch.Tensor, mask=None) -> torch.Tensor:
        calls.append(spec.shape[0])
        return original(spec, mask)

    monkeypatch.setattr(ssast.model, "forward_features", counting)
    emb, ts = hear.get_timestamp_embeddings(torch.randn(1, 60 * SR) * 0.1, model)
    # 6001 frames -> 31 chunks encoded; 1500 steps centred within the minute, the last at 59.975 s.
    assert emb.shape == (1, 1500, 960) and ts[0, -1] == 59975.0
    assert calls == [8, 8, 8, 7]


def test_embedding_t_is_the_patch_time_step_t_of_the_clip(monkeypatch):
    """A stand-in encoder that returns each token's own patch values exposes exactly where each lands."""
    model = hear.HearModel(hear.random_model("transformer"))
    enc = model.model

    def patches_as_tokens(spec: torch.Tensor, mask=None) -> torch.Tensor:
        tokens = patchify(spec, enc.patch_size).repeat(1, 1, enc.d_model // 64)  # [n, 250, 192]
        return torch.cat([torch.full_like(tokens[:, :1], 99.0), tokens], dim=1)  # a cls token to drop

    monkeypatch.setattr(enc, "forward_features", patches_as_tokens)
    audio = torch.randn(2, round(4.5 * SR)) * 0.1  # 451 frames: three chunks, the last one padded
    emb, _ = hear.get_timestamp_embeddings(audio, model)
    spec = model.spectrogram(audio)  # [2, 451, 80], normalised over the whole clip
    assert torch.allclose(spec, enc.frontend(audio)[:, 0])
    n_frames = spec.shape[1]
    assert emb.shape[1] == math.ceil(n_frames / 4) == 113
    padded = torch.nn.functional.pad(spec, (0, 0, 0, 4 * emb.shape[1] - n_frames))
    for b in range(2):
        for t in range(emb.shape[1]):
            frames = padded[b, 4 * t : 4 * t + 4]  # the 4 frames of time step t, all 80 bins
            expected = torch.cat([frames[:, 16 * f : 16 * f + 16].reshape(-1).repeat(3) for f in range(5)])
            assert torch.equal(emb[b, t], expected), (b, t)


def test_a_causal_encoder_shows_time_order_exactly():
    """SSAM scans forward: embeddings before an event cannot change when only later audio changes."""
    model = hear.load_model(family="mamba")
    n = 31840  # 200 frames: one chunk
    # Same burst at 0.8 s or 1.2 s: the same frames, so per-clip normalisation is the same for both.
    emb, _ = hear.get_timestamp_embeddings(torch.stack([tone_burst(0.8, n), tone_burst(1.2, n)]), model)
    diff = (emb[0] - emb[1]).norm(dim=-1)
    # Step t sees frames up to 4t + 3, whose window ends at 40t + 42.5 ms: before 800 ms for t <= 18.
    assert diff[:19].max() < 1e-3
    assert diff[20:30].min() > 1.0  # from the first burst on, the clips differ


def test_event_position_moves_the_most_changed_timestamps(ssast):
    """In a bidirectional encoder the timestamps that stand out from the clip's median are the event's."""
    n = 4 * SR
    for onset, (lo, hi) in [(0.8, (19, 30)), (2.6, (64, 75))]:  # burst covers steps 20-29 / 65-74
        emb, _ = hear.get_timestamp_embeddings(tone_burst(onset, n)[None], ssast)
        deviation = (emb[0] - emb[0].median(dim=0).values).norm(dim=-1)
        top = deviation.topk(8).indices
        assert ((top >= lo) & (top <= hi)).all(), (onset, sorted(top.tolist()))


def test_float64_is_converted_and_outputs_stay_on_the_input_device(ssast):
    audio = torch.randn(2, SR) * 0.1
    emb32 = hear.get_scene_embeddings(audio, ssast)
    emb64 = hear.get_scene_embeddings(audio.double(), ssast)
    assert emb64.dtype == torch.float32 and emb64.device == audio.device
    assert torch.allclose(emb32, emb64, atol=1e-5)


def test_zero_sounds_give_empty_outputs(ssast):
    emb, ts = hear.get_timestamp_embeddings(torch.zeros(0, SR), ssast)
    assert emb.shape == (0, 25, 960) and ts.shape == (0, 25)
    assert hear.get_scene_embeddings(torch.zeros(0, SR), ssast).shape == (0, 960)


@pytest.mark.parametrize(
    ("audio", "message"),
    [
        ([[0.0] * 1600], "must be a torch.Tensor"),
        (torch.zeros(1, 1600).numpy(), "must be a torch.Tensor"),
        (torch.zeros(1, 1600, dtype=torch.int16), "must be floating point"),
        (torch.zeros(1, 1600, dtype=torch.bool), "must be floating point"),
        (torch.zeros(1600), r"shape \[n_sounds, n_samples\].*audio\[None\]"),
        (torch.zeros(1, 1, 1600), r"shape \[n_sounds, n_samples\]"),
        (torch.zeros(2, 0), "zero samples"),
        (torch.tensor([[0.0, float("nan")], [0.0, 0.0]]), r"NaN or infinite samples \(sounds \[0\]\)"),
        (torch.tensor([[0.0, 0.0], [float("inf"), 0.0]]), r"NaN or infinite samples \(sounds \[1\]\)"),
    ],
)
def test_bad_inputs_are_value_errors(ssast, audio, message):
    with pytest.raises(ValueError, match=message):
        hear.get_timestamp_embeddings(audio, ssast)
    with pytest.raises(ValueError, match=message):
        hear.get_scene_embeddings(audio, ssast)


def test_model_must_come_from_load_model():
    with pytest.raises(ValueError, match=r"from msm_lightning\.hear\.encoder\.load_model \(a HearModel\)"):
        hear.get_scene_embeddings(torch.zeros(1, 1600), torch.nn.Linear(1, 1))
    from hear_modules import logmel, ssam

    with pytest.raises(
        ValueError, match=r"from hear_modules\.ssam\.load_model \(a HearModel\), got LogMelBaseline"
    ):
        ssam.get_timestamp_embeddings(torch.zeros(1, 1600), logmel.load_model())


def test_module_functions_are_the_modules_own():
    from hear_modules import ssam

    for function in (ssam.load_model, ssam.get_scene_embeddings, ssam.get_timestamp_embeddings):
        assert function.__module__ == "hear_modules.ssam" and function.__doc__
    assert list(inspect.signature(ssam.load_model).parameters) == ["model_file_path", "size", "chunk_batch"]
    assert "SSAM" in ssam.load_model.__doc__
    with pytest.raises(TypeError):
        ssam.load_model(family="transformer")  # the module's family is fixed


def test_dropped_steps_are_past_the_end_and_scene_is_the_mean_of_the_kept_ones(ssast):
    """2 s: 201 frames make 51 patch steps; the 51st (centre 2015 ms) is after the end and is dropped."""
    audio = torch.randn(2, 2 * SR) * 0.1
    with torch.no_grad():
        steps = ssast.embed_timestamps(audio)
    emb, ts = hear.get_timestamp_embeddings(audio, ssast)
    assert steps.shape[1] == 51 and emb.shape[1] == 50 and ts[0, -1] == 1975.0
    assert torch.equal(emb, steps[:, :50])
    assert torch.allclose(hear.get_scene_embeddings(audio, ssast), emb.mean(dim=1), atol=1e-6)


def test_unknown_family_is_a_value_error():
    with pytest.raises(ValueError, match="unknown encoder family 'lstm'"):
        hear.load_model(family="lstm")
