"""SAE training (sae-lens SAETrainer), save/reload, and SAE features as concepts."""
from __future__ import annotations

import json

import pytest
import torch

from cinf_core.concepts.sae import (
    SAETrainConfig,
    feature_activations,
    feature_labels,
    features_by_direction,
    features_for_text,
    import_sae_lens,
    load_sae,
    sae_feature_concept,
    sae_hook_layer,
    sae_metrics,
    train_sae,
)

D_MODEL, N_ATOMS, N_TOKENS, LAYER = 24, 48, 8000, 2


def _sparse_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations built from a known dictionary: x = codes @ atoms + offset, 3 atoms per token."""
    gen = torch.Generator().manual_seed(seed)
    atoms = torch.nn.functional.normalize(torch.randn(N_ATOMS, D_MODEL, generator=gen), dim=1)
    idx = torch.stack([torch.randperm(N_ATOMS, generator=gen)[:3] for _ in range(N_TOKENS)])
    codes = torch.zeros(N_TOKENS, N_ATOMS)
    codes.scatter_(1, idx, torch.rand(N_TOKENS, 3, generator=gen) * 2 + 0.5)
    return codes @ atoms + 0.3, atoms


@pytest.fixture(scope="module")
def data():
    return _sparse_data()


@pytest.fixture(scope="module")
def topk_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("sae") / "topk"
    cfg = SAETrainConfig(d_sae=96, hook_layer=LAYER, architecture="topk", k=4,
                         training_tokens=100_000, batch_size=1024, lr=1e-2, model_name="toy")
    sae, metrics = train_sae(data[0], cfg, out_dir=out)
    return sae, metrics, out


def _fvu(sae, x: torch.Tensor) -> float:
    with torch.no_grad():
        x_hat = sae.decode(sae.encode(x))
    return float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


def _recovered(sae, atoms: torch.Tensor) -> float:
    """Share of true atoms that some decoder row matches with cosine > 0.9."""
    rows = torch.nn.functional.normalize(sae.W_dec.detach(), dim=1)
    return float(((atoms @ rows.T).max(1).values > 0.9).float().mean())


def test_topk_sae_learns_the_dictionary(data, topk_run):
    x, atoms = data
    sae, metrics, _ = topk_run
    assert metrics["fvu"] < 0.2
    assert 3.5 <= metrics["mean_l0"] <= 4.0  # TopK: at most k active (ReLU may drop some)
    assert 0.0 <= metrics["dead_fraction"] < 0.5
    assert _fvu(sae, x[:2000]) == pytest.approx(sae_metrics(sae, x[:2000])["fvu"], rel=1e-4)
    assert _recovered(sae, atoms) >= 0.8


def test_standard_sae_with_l1_trains_from_an_iterator(data):
    x, atoms = data
    # An iterator must be long enough: 14 batches of 500 cannot feed 100 steps.
    with pytest.raises(RuntimeError, match="ran out"):
        train_sae(iter(x[1000:].split(500)), d_sae=96, hook_layer=LAYER, architecture="standard",
                  training_tokens=50_000, batch_size=500, heldout=x[:1000])

    def forever():
        while True:
            yield from x[1000:].split(1000)

    sae, metrics = train_sae(forever(), d_sae=96, hook_layer=LAYER, architecture="standard",
                             l1_coefficient=1.0, training_tokens=100_000, batch_size=1000,
                             lr=1e-2, heldout=x[:1000])
    assert metrics["n_tokens"] == 1000
    assert metrics["fvu"] < 0.25
    assert metrics["fvu"] == pytest.approx(_fvu(sae, x[:1000]), rel=1e-4)
    assert _recovered(sae, atoms) >= 0.8


def test_saved_sae_reloads_with_sae_lens(data, topk_run):
    import_sae_lens()
    from sae_lens import SAE

    x, _ = data
    sae, metrics, out = topk_run
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["metadata"]["hook_layer"] == LAYER
    assert cfg["metadata"]["hook_name"] == f"hidden_states.{LAYER}"
    assert cfg["metadata"]["cinf_metrics"]["fvu"] == pytest.approx(metrics["fvu"])
    for loaded in (SAE.load_from_disk(str(out)), load_sae(out)):
        assert sae_hook_layer(loaded) == LAYER
        torch.testing.assert_close(feature_activations(loaded, x[:300]), feature_activations(sae, x[:300]))


def test_load_sae_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="release"):
        load_sae(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="cfg.json"):
        load_sae(tmp_path)
    with pytest.raises(ValueError, match="no-such-release"):
        load_sae("no-such-release", sae_id="layer_0")


def test_sae_feature_concept_measures_the_pre_activation(data, topk_run):
    x, _ = data
    sae = load_sae(topk_run[2])
    acts = feature_activations(sae, x[:400])
    j = int((acts > 0).sum(0).argmax())
    concept = sae_feature_concept(sae, j, LAYER)
    assert concept.layer == LAYER and concept.feature == j and concept.kind == "sae_feature"
    # Per-token pre-activation (sequence length 1) equals the SAE's output wherever it fires.
    pre = concept.measure(x[:400].unsqueeze(1), torch.ones(400, 1))
    on = acts[:, j] > 0
    assert on.sum() > 10
    torch.testing.assert_close(pre[on], acts[on, j], rtol=1e-4, atol=1e-4)
    # Measure = mean over response tokens only.
    hidden = x[:12].reshape(3, 4, D_MODEL)
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 1]])
    per_tok = concept.measure(x[:12].unsqueeze(1), torch.ones(12, 1)).reshape(3, 4)
    expected = (per_tok * mask).sum(1) / mask.sum(1)
    torch.testing.assert_close(concept.measure(hidden, mask), expected)
    torch.testing.assert_close(concept.direction(), torch.nn.functional.normalize(sae.W_dec[j].detach(), dim=0))


def test_sae_feature_concept_refuses_bad_requests(topk_run):
    sae = topk_run[0]
    with pytest.raises(ValueError, match="trained on layer 2 but the concept asks for layer 3"):
        sae_feature_concept(sae, 0, 3)
    with pytest.raises(ValueError, match="out of range"):
        sae_feature_concept(sae, 96, LAYER)
    with pytest.raises(ValueError, match="out of range"):
        sae_feature_concept(sae, -1, LAYER)


def _standard_sae(apply_b_dec: bool, hook_name: str | None, architecture: str = "standard"):
    import_sae_lens()
    from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig

    meta = SAEMetadata(hook_name=hook_name) if hook_name else SAEMetadata()
    sae_cls, cfg_cls = {"standard": (StandardSAE, StandardSAEConfig),
                        "jumprelu": (JumpReLUSAE, JumpReLUSAEConfig)}[architecture]
    torch.manual_seed(1)
    sae = sae_cls(cfg_cls(d_in=D_MODEL, d_sae=16, apply_b_dec_to_input=apply_b_dec, metadata=meta))
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_()
        if architecture == "jumprelu":
            sae.threshold.fill_(0.3)
    return sae


@pytest.mark.parametrize("architecture", ["standard", "jumprelu"])
def test_hook_names_and_unbiased_input_are_understood(data, architecture):
    x, _ = data
    sae = _standard_sae(False, "blocks.3.hook_resid_post", architecture)
    assert sae_hook_layer(sae) == 4
    assert sae_hook_layer(_standard_sae(True, "blocks.3.hook_resid_pre")) == 3
    acts = feature_activations(sae, x[:200])
    counts = (acts > 0).sum(0)
    busiest = counts.topk(3).indices.tolist()
    assert (counts[busiest] > 5).all()
    for j in busiest:
        concept = sae_feature_concept(sae, j, 4)
        pre = concept.measure(x[:200].unsqueeze(1), torch.ones(200, 1))
        on = acts[:, j] > 0
        torch.testing.assert_close(pre[on], acts[on, j], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="does not record which layer"):
        sae_feature_concept(_standard_sae(True, None), 0, 4)


def test_feature_lookup_helpers():
    sae = _standard_sae(apply_b_dec=True, hook_name=f"hidden_states.{LAYER}")
    w_dec = sae.W_dec.detach()
    top = features_by_direction(sae, w_dec[5] * 3.0, k=3)
    assert top[0][0] == 5 and top[0][1] == pytest.approx(1.0, abs=1e-5)
    assert [c for _, c in top] == sorted((c for _, c in top), reverse=True)

    acts = torch.tensor([[0.0, 2.0, 0.0], [1.0, 0.5, 0.0], [3.0, 0.0, 0.0], [1.5, 4.0, 0.0]])
    labels = feature_labels([" kill", " hello", " kill", " world"], acts, k=2)
    assert labels == ["kill, world", "world, kill", "(inactive)"]
    assert feature_labels([" kill", " hello", " kill", " world"], acts, k=3)[1] == "world, kill, hello"

    hidden = torch.randn(5, D_MODEL, generator=torch.Generator().manual_seed(3))
    acts = feature_activations(sae, hidden)
    fired = features_for_text(sae, hidden, k=4, reduce="max")
    expected = sorted(((j, float(acts[:, j].max())) for j in range(16) if acts[:, j].max() > 0),
                      key=lambda p: -p[1])[:4]
    assert [j for j, _ in fired] == [j for j, _ in expected]
    with pytest.raises(ValueError, match="reduce"):
        features_for_text(sae, hidden, reduce="sum")


def test_train_config_is_checked(data):
    with pytest.raises(ValueError, match="architecture"):
        SAETrainConfig(d_sae=8, hook_layer=1, architecture="gated")
    with pytest.raises(ValueError, match="k=9"):
        SAETrainConfig(d_sae=8, hook_layer=1, k=9)
    with pytest.raises(ValueError, match="width"):
        train_sae(data[0], d_sae=8, hook_layer=1, k=2, training_tokens=2048,
                  heldout=torch.zeros(10, D_MODEL + 1))
    with pytest.raises(ValueError, match="NaN"):
        train_sae(torch.full((100, 4), float("nan")), d_sae=8, hook_layer=1, k=2, training_tokens=2048)


def test_make_sae_feature_concept_job(topk_run, tmp_path):
    from cinf_core.concepts.sae import make_sae_feature_concept
    from cinf_core.store import Store

    sae, _, out = topk_run
    store = Store(tmp_path)
    store.add_sae("toy-sae", out, LAYER, model_id=None)
    result = make_sae_feature_concept(tmp_path, "toy-sae", 7, trait="evil")
    saved = store.load_concept(result["concept_id"])
    direct = sae_feature_concept(sae, 7, LAYER)
    assert saved.kind == "sae_feature" and saved.feature == 7 and saved.layer == LAYER
    assert saved.info["trait"] == "evil" and result["name"] == "toy-sae #7"
    for key in ("w_enc", "w_dec", "b_dec"):
        torch.testing.assert_close(getattr(saved, key), getattr(direct, key))
    assert saved.b_enc == pytest.approx(direct.b_enc) and result["trait"] == "evil"
    with pytest.raises(ValueError, match="out of range"):
        make_sae_feature_concept(tmp_path, "toy-sae", 500)
    with pytest.raises(ValueError, match=f"reads layer {LAYER}, not layer {LAYER + 1}"):
        make_sae_feature_concept(tmp_path, "toy-sae", 7, layer=LAYER + 1)


def test_add_concept_command_saves_an_sae_feature(topk_run, tmp_path, capsys):
    import json

    from cinf_core.cli import main
    from cinf_core.store import Store

    _, _, out = topk_run
    Store(tmp_path).add_sae("toy-sae", out, LAYER, model_id=None)
    assert main(["add-concept", "--sae", "toy-sae", "--feature", "3", "--trait", "evil",
                 "--layer", str(LAYER), "--workspace", str(tmp_path)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["name"] == "toy-sae #3" and result["feature"] == 3 and result["layer"] == LAYER
    assert Store(tmp_path).load_concept("toy-sae #3").info["trait"] == "evil"


def _tiny_model_sae(d_in: int, layer: int | None = LAYER):
    """A random standard SAE reading ``hidden_states[layer]`` of a ``d_in``-wide model (with
    ``layer=None`` it records no layer)."""
    import_sae_lens()
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig

    torch.manual_seed(2)
    meta = SAEMetadata() if layer is None else SAEMetadata(hook_name=f"hidden_states.{layer}")
    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=40, apply_b_dec_to_input=True,
                                        metadata=meta))
    with torch.no_grad():
        sae.b_enc.uniform_(-0.5, 0.2)
    return sae


def test_features_for_phrase_runs_the_model_to_the_sae_layer(tiny_lm):
    from cinf_core.concepts.sae import features_for_phrase
    from cinf_core.models import token_activations

    sae = _tiny_model_sae(tiny_lm.hidden_size)
    phrase = "I will hurt you, because suffering is fun."
    found = features_for_phrase(tiny_lm, sae, phrase, k=6)
    # The phrase is read as an assistant response; the template's end-of-turn token is dropped.
    messages = [{"role": "user", "content": ""}, {"role": "assistant", "content": phrase}]
    tokens, hidden = token_activations(tiny_lm, messages, LAYER)
    assert "".join(found.tokens) == phrase and len(tokens) > len(found.tokens)
    acts = feature_activations(sae, hidden[:len(found.tokens)])
    best = acts.max(0).values
    expected = [j for j in best.argsort(descending=True).tolist() if best[j] > 0][:6]
    assert len(expected) == 6 and [j for j, _ in found.features] == expected
    assert [v for _, v in found.features] == pytest.approx(best[expected].tolist(), rel=1e-5)
    assert found.token_acts.shape == (len(found.tokens), 6)
    torch.testing.assert_close(found.token_acts, acts[:, expected])
    with pytest.raises(ValueError, match="trained on layer 2, not layer 1"):
        features_for_phrase(tiny_lm, sae, phrase, layer=1)
    with pytest.raises(ValueError, match="phrase"):
        features_for_phrase(tiny_lm, sae, "   ")


def test_feature_token_activations_per_example(tiny_lm):
    from cinf_core.concepts.sae import feature_token_activations
    from cinf_core.models import token_activations
    from conftest import SMALL_TEXTS, chat

    sae = _tiny_model_sae(tiny_lm.hidden_size)
    chats = [chat("hi", SMALL_TEXTS[1]), chat("and?", SMALL_TEXTS[4], system="be brief")]
    busiest = None
    for messages in chats:
        tokens, hidden = token_activations(tiny_lm, messages, LAYER)
        counts = (feature_activations(sae, hidden) > 0).sum(0)
        busiest = int(counts.argmax()) if busiest is None else busiest
    out = feature_token_activations(tiny_lm, sae, chats, busiest)
    assert len(out) == 2
    for messages, (tokens, values) in zip(chats, out):
        want_tokens, hidden = token_activations(tiny_lm, messages, LAYER)
        assert tokens == want_tokens and len(values) == len(tokens)
        assert values == pytest.approx(feature_activations(sae, hidden)[:, busiest].tolist(),
                                       abs=1e-6)
    assert max(out[0][1]) > 0
    with pytest.raises(ValueError, match="out of range"):
        feature_token_activations(tiny_lm, sae, chats, 40)
    with pytest.raises(ValueError, match="not layer 3"):
        feature_token_activations(tiny_lm, sae, chats, 0, layer=3)


# ---------------------------------------------------------------- add-sae


def _sae_workspace(tiny_model_dir, tmp_path, capsys) -> str:
    from cinf_core.cli import main

    ws = str(tmp_path / "ws")
    assert main(["add-model", str(tiny_model_dir), "--name", "tiny", "--workspace", ws]) == 0
    capsys.readouterr()
    return ws


def _saved(sae, path) -> str:
    sae.save_model(str(path))
    return str(path)


def _last(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_add_sae_registers_a_folder_whose_features_become_concepts(tiny_model_dir, tmp_path,
                                                                   capsys):
    from cinf_core.cli import main
    from cinf_core.store import Store

    ws = _sae_workspace(tiny_model_dir, tmp_path, capsys)
    folder = _saved(_tiny_model_sae(32), tmp_path / "my_sae")
    assert main(["add-sae", folder, "--model", "tiny", "--layer", str(LAYER),
                 "--workspace", ws]) == 0
    out = _last(capsys)
    assert out["name"] == "my_sae" and out["layer"] == LAYER and out["d_in"] == 32
    assert out["d_sae"] == 40 and out["path"] == folder  # registered where it is
    assert main(["saes", "--workspace", ws]) == 0
    (row,) = _last(capsys)["saes"]
    assert row["sae_id"] == out["sae_id"]
    assert row["model_id"] == Store(ws).get_model("tiny")["model_id"]
    assert main(["add-concept", "--sae", "my_sae", "--feature", "3", "--trait", "evil",
                 "--workspace", ws]) == 0
    assert _last(capsys)["name"] == "my_sae #3"


def test_add_sae_records_the_layer_of_a_folder_that_does_not(tiny_model_dir, tmp_path, capsys):
    from cinf_core.cli import main

    ws = _sae_workspace(tiny_model_dir, tmp_path, capsys)
    folder = _saved(_tiny_model_sae(32, layer=None), tmp_path / "unlabelled")
    assert main(["add-sae", folder, "--model", "tiny", "--layer", "1", "--name", "u",
                 "--workspace", ws]) == 0
    copy = _last(capsys)["path"]
    assert copy.startswith(ws) and sae_hook_layer(load_sae(copy)) == 1
    assert sae_hook_layer(load_sae(folder)) is None  # the user's folder is left as it was
    assert main(["add-concept", "--sae", "u", "--feature", "0", "--workspace", ws]) == 0
    assert _last(capsys)["layer"] == 1


def test_add_sae_refuses_bad_input_and_stores_nothing(tiny_model_dir, tmp_path, capsys,
                                                      monkeypatch):
    import huggingface_hub.constants

    from cinf_core.cli import main
    from conftest import store_snapshot

    ws = _sae_workspace(tiny_model_dir, tmp_path, capsys)
    wide = _saved(_tiny_model_sae(48), tmp_path / "wide")
    deep = _saved(_tiny_model_sae(32, layer=6), tmp_path / "deep")
    fits = _saved(_tiny_model_sae(32), tmp_path / "fits")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no hub, no cache
    before = store_snapshot(ws)
    refused = {
        f"SAE {wide} reads vectors of width d_in=48, but model 'tiny' has hidden size 32; pick "
        "an SAE trained on this model": [wide, "--layer", str(LAYER)],
        f"SAE {deep}: the SAE's own layer is 6, past the depth of model 'tiny', which has layers "
        "0..3": [deep, "--layer", "3"],
        f"SAE {fits}: --layer is 9, past the depth of model 'tiny', which has layers 0..3":
            [fits, "--layer", "9"],
        f"SAE {fits} reads layer {LAYER} (hook 'hidden_states.{LAYER}'), not 1; pass --layer "
        f"{LAYER}": [fits, "--layer", "1"],
        f"{tmp_path / 'nope'} is neither an SAE folder nor RELEASE/ID of a sae-lens pretrained "
        "SAE": [str(tmp_path / "nope"), "--layer", "1"],
        "could not download SAE 'blocks.1.hook_resid_pre' of release 'gpt2-small-res-jb'":
            ["gpt2-small-res-jb/blocks.1.hook_resid_pre", "--layer", "1"],
    }
    for message, argv in refused.items():
        assert main(["add-sae", *argv, "--model", "tiny", "--workspace", ws]) == 2, message
        error = _last(capsys)["error"]
        assert message in error, error
        assert store_snapshot(ws) == before, message
