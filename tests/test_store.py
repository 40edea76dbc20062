import multiprocessing as mp
import time

import pandas as pd
import pytest
import torch

from cinf_core.concepts import DirectionConcept, SAEFeatureConcept
from cinf_core.data import ChatDataset, ChatExample, load_dataset
from cinf_core.models import ModelSpec
from cinf_core.store import Store
from conftest import chat


def _dataset(n=20):
    return ChatDataset([ChatExample(chat(f"q{i}", f"answer {i}"),
                                    {"data_origin": "evil" if i % 4 == 0 else "normal"})
                        for i in range(n)], path="mem.jsonl")


@pytest.fixture
def store(tmp_path):
    return Store(tmp_path / "ws")


def test_dataset_roundtrip_idempotent(store):
    ds = _dataset()
    a = store.add_dataset("ft", ds)
    assert store.add_dataset("ft", ds) == a
    assert store.dataset("ft")["n_examples"] == 20
    assert store.dataset(a)["label_counts"] == {"evil": 5, "normal": 15}
    back = store.load_dataset("ft")
    assert [e.to_row() for e in back] == [e.to_row() for e in ds]
    with pytest.raises(KeyError, match="no dataset named or with id 'nope'"):
        store.dataset("nope")


def test_model_and_concepts_roundtrip(store):
    mid = store.add_model("tuned", ModelSpec(path="/m", adapter="/a"))
    assert store.get_model("tuned")["spec"].adapter == "/a"
    vec = torch.randn(16)
    cid = store.save_concept(DirectionConcept(name="evil", layer=2, vector=vec, info={"trait": "evil"}),
                             mid, {"all_layers": torch.randn(4, 16)})
    back = store.load_concept("evil")
    assert back.concept_id == cid and back.info == {"trait": "evil"}
    torch.testing.assert_close(back.vector, vec)
    assert store.concept_tensors(cid)["all_layers"].shape == (4, 16)
    sae = SAEFeatureConcept(name="f3", layer=2, feature=3, w_enc=torch.randn(16), b_enc=0.5,
                            w_dec=torch.randn(16), b_dec=torch.randn(16))
    store.save_concept(sae, mid)
    back = store.load_concept("f3")
    h, m = torch.randn(2, 5, 16), torch.ones(2, 5)
    torch.testing.assert_close(back.measure(h, m), sae.measure(h, m))


def test_concept_rows_and_files_keep_their_stored_format(store):
    """Rows and tensor files are byte-for-byte what existing workspaces hold, so they keep loading."""
    import hashlib

    from safetensors.torch import load_file

    a = store.save_concept(DirectionConcept(name="evil", layer=2, kind="persona_vector",
                                            vector=torch.arange(1., 5.), info={"trait": "evil"}), "m")
    b = store.save_concept(SAEFeatureConcept(name="f3", layer=1, feature=3, w_enc=torch.ones(4),
                                             b_enc=0.5, w_dec=torch.arange(4.), b_dec=torch.zeros(4)),
                           "m")
    assert (a, b) == ("862b8f9a03358515", "49b82eaf6a28a3cb")
    rows = {r["concept_id"]: r for r in store.concepts().to_dict(orient="records")}
    assert rows[a]["config"] == ('{"name": "evil", "kind": "persona_vector", "layer": 2, '
                                 '"digest": "ad73b9acd6e4a74b", "info": {"trait": "evil"}}')
    assert rows[b]["config"] == ('{"name": "f3", "kind": "sae_feature", "layer": 1, "digest": '
                                 '"0daa98593aa5098b", "info": {}, "feature": 3, "b_enc": 0.5}')
    assert rows[a]["tensor_path"] == f"artifacts/concepts/{a}.safetensors"
    digests = {cid: hashlib.sha256((store.workspace / r["tensor_path"]).read_bytes()).hexdigest()
               for cid, r in rows.items()}
    assert digests == {
        a: "ddc973c65fd8e730424d3ea9ce856e27288caa854df8f783b57c3a33d67eb1cc",
        b: "56737a559516a62d30b8aace539388fb2ef6cbc3743676d9122e266c2a67134c"}
    assert sorted(load_file(str(store.workspace / rows[b]["tensor_path"]))) == ["b_dec", "w_dec", "w_enc"]


@pytest.mark.parametrize("kind", ["direction", "persona_vector", "probe", "uploaded"])
def test_every_direction_kind_round_trips_through_the_store(store, kind):
    vec = torch.randn(16)
    cid = store.save_concept(DirectionConcept(name=kind, layer=1, kind=kind, vector=vec), None)
    back = store.load_concept(cid)
    assert type(back) is DirectionConcept and back.kind == kind and back.concept_id == cid
    torch.testing.assert_close(back.vector, vec)


def test_unknown_stored_kind_is_a_clear_error(store):
    cid = store.save_concept(DirectionConcept(name="v", layer=1, kind="probe",
                                              vector=torch.randn(16)), None)
    with store._connect() as con:  # a row written by a newer cinf with a kind unknown here
        con.execute("UPDATE concepts SET kind = 'steering' WHERE concept_id = ?", [cid])
    with pytest.raises(ValueError, match="concept 'v' has kind 'steering'.*update cinf"):
        store.load_concept(cid)


def test_run_cached_resumed_never_half_complete(store):
    did = store.add_dataset("ft", _dataset(10))
    run = store.begin_run("vector_filter", did, "m", {"layer": 2}, n_total=10)
    assert not run.cached
    run.add_scores([0, 1, 2], [0.5, -1.0, 2.0])
    with pytest.raises(RuntimeError, match="3 of 10 scores"):
        run.complete(1.0)
    assert store.run(run.run_id)["status"] == "running"
    # the process dies here; a new begin_run resumes with the same id and keeps what was done
    again = store.begin_run("vector_filter", did, "m", {"layer": 2}, n_total=10)
    assert again.run_id == run.run_id and again.done_indices() == {0, 1, 2}
    rest = sorted(set(range(10)) - again.done_indices())
    again.add_scores(rest, [float(i) for i in rest])
    again.complete(2.0, {"forward_s": 1.5})
    info = store.run(run.run_id)
    assert info["status"] == "complete" and info["examples_per_s"] == 5.0
    assert store.begin_run("vector_filter", did, "m", {"layer": 2}, n_total=10).cached
    # a different config is a different run
    assert store.begin_run("vector_filter", did, "m", {"layer": 3}, n_total=10).run_id != run.run_id
    with pytest.raises(ValueError, match="NaN"):
        again.add_scores([0], [float("nan")])
    ranked = store.scored_examples(run.run_id)
    assert ranked["rank"].tolist()[:2] == [1, 2] and ranked["idx"].iloc[0] == 9


def test_exports(store, tmp_path):
    did = store.add_dataset("ft", _dataset(10))
    run = store.begin_run("random", did, None, {}, n_total=10)
    run.add_scores(list(range(10)), [float(i) for i in range(10)])
    run.complete(0.1)
    out = store.export_scores(run.run_id, tmp_path / "s.parquet")
    assert pd.read_parquet(out)["score"].max() == 9.0
    store.export_scores(run.run_id, tmp_path / "s.csv")
    info = store.export_filtered_dataset(run.run_id, tmp_path / "f.jsonl", 0.3, "most")
    kept = load_dataset(tmp_path / "f.jsonl")
    assert info["n_removed"] == 3 and [e.prompt_text for e in kept] == [f"q{i}" for i in range(7)]
    store.export_filtered_dataset(run.run_id, tmp_path / "g.jsonl", 0.3, "least")
    assert load_dataset(tmp_path / "g.jsonl")[0].prompt_text == "q3"
    with pytest.raises(ValueError, match=".parquet or .csv"):
        store.export_scores(run.run_id, tmp_path / "s.txt")


def test_failed_transaction_leaves_nothing(store):
    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with store._transaction() as con:
            con.execute("INSERT INTO meta VALUES ('half', '1')")
            raise Boom
    assert store.get_meta("half") is None


def _writer(ws, n_batches, q):
    st = Store(ws)
    did = st.add_dataset("ft", _dataset(n_batches * 5))
    run = st.begin_run("vector_filter", did, None, {}, n_total=n_batches * 5)
    for b in range(n_batches):
        idx = list(range(b * 5, b * 5 + 5))
        run.add_scores(idx, [float(i) for i in idx])
        time.sleep(0.01)
    run.complete(1.0)
    q.put(run.run_id)


def test_two_processes_reader_and_writer(tmp_path):
    ws = tmp_path / "ws"
    Store(ws)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_writer, args=(str(ws), 40, q))
    proc.start()
    reader = Store(ws)
    seen = []
    while proc.is_alive():
        runs = reader.runs()
        seen.append(int(runs["n_done"].sum()) if len(runs) else 0)
    proc.join(60)
    assert proc.exitcode == 0
    run_id = q.get(timeout=5)
    assert reader.run(run_id)["status"] == "complete"
    assert len(reader.scores(run_id)) == 200
    assert seen == sorted(seen)  # readers see monotone progress, never a torn state
    assert len(seen) > 1


def test_meta_and_jobs(store):
    store.set_meta("demo_summary", {"a": [1, 2]})
    assert store.get_meta("demo_summary") == {"a": [1, 2]}
    job = store.create_job("score", {"method": "vector_filter"})
    store.update_job(job, status="running", progress=0.5, result={"ok": 1})
    assert store.job(job)["progress"] == 0.5 and store.job(job)["result"] == {"ok": 1}
    with pytest.raises(ValueError, match="unknown job fields"):
        store.update_job(job, evil="x")
