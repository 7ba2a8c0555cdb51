"""Provenance in results.json: two tiny-llama runs that differ only in data.nsamples have different calibration
hashes and the same model hash; every field exists with the right type; the hash functions on hand-made inputs;
file hashes are remembered by (path, size, mtime) and recomputed when the file changes."""
from __future__ import annotations

import hashlib
import os

import pytest
import torch

from msp import provenance


def tiny_run(tmp_path, name: str, *overrides: str) -> dict:
    from hydra import compose, initialize_config_dir

    from msp.cli import CONF_DIR, spec_from_config
    from msp.run import run

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["model=tiny-llama", "data=tiny", "pruner=magnitude", "device=cpu",
                                                       f"cache_dir={tmp_path / 'cache'}", *overrides])
    return run(spec_from_config(cfg), tmp_path / name)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prov")
    return tiny_run(tmp, "a", "data.nsamples=4"), tiny_run(tmp, "b", "data.nsamples=2")


def test_different_data_different_calibration_hash_same_model_hash(two_runs):
    a, b = (r["provenance"] for r in two_runs)
    assert a["data_sha256"]["calibration"] != b["data_sha256"]["calibration"]
    assert a["data_sha256"]["evaluation"] == b["data_sha256"]["evaluation"]  # same eval windows
    assert a["model_sha256"] == b["model_sha256"]
    assert a["model_sha256"]["source"] == "state_dict"  # tiny random model: no weights file


def test_provenance_fields_and_types(two_runs):
    res = two_runs[0]
    p = res["provenance"]
    assert p["msp_version"] == __import__("msp").__version__
    assert set(p["git"]) == {"revision", "dirty"}
    if p["git"]["revision"] is not None:  # run from a checkout (the test suite is)
        assert len(p["git"]["revision"]) == 40 and isinstance(p["git"]["dirty"], bool)
    assert set(p["versions"]) == {"python", "torch", "transformers", "lm_eval", "datasets"}
    assert p["versions"]["torch"] == torch.__version__ and p["versions"]["python"].count(".") == 2
    assert isinstance(p["device_name"], str) and p["device_name"] and p["device_name"] != "cpu"
    assert p["cpu_threads"] == torch.get_num_threads()  # the run sets the summation order of CPU matmuls with it
    assert p["seeds"]["seed"] == 0 and p["config_hash"] == res["config_hash"]
    for digest in [p["model_sha256"]["sha256"], p["data_sha256"]["calibration"], p["data_sha256"]["heldout"],
                   *p["data_sha256"]["evaluation"].values()]:
        assert isinstance(digest, str) and len(digest) == 64 and int(digest, 16) >= 0
    assert set(p["data_sha256"]["evaluation"]) == {"wiki"}
    # every key a results.json had before is still there
    for key in ("model", "ppl", "dense_ppl", "seed", "device", "config_hash", "cache", "timings", "data"):
        assert key in res


def test_tensor_hash_is_sha256_of_name_dtype_shape_and_bytes():
    t = torch.tensor([[1, 2], [3, 258]], dtype=torch.int64)
    expected = hashlib.sha256(b"|torch.int64|(2, 2)|" + t.numpy().tobytes()).hexdigest()
    assert provenance.tensor_sha256(t) == expected
    assert provenance.tensor_sha256(t) != provenance.tensor_sha256(t.to(torch.int32))  # dtype counts
    assert provenance.tensor_sha256(t) != provenance.tensor_sha256(t.reshape(4))  # shape counts
    assert provenance.tensor_sha256(torch.ones(3, dtype=torch.bfloat16))  # dtypes numpy lacks hash too


def test_state_dict_hash_changes_with_one_weight(tiny_llama):
    tiny_llama = tiny_llama.model
    before = provenance.state_dict_sha256(tiny_llama)
    assert provenance.state_dict_sha256(tiny_llama) == before
    with torch.no_grad():
        next(tiny_llama.parameters()).view(-1)[0] += 1.0
    assert provenance.state_dict_sha256(tiny_llama) != before


def test_file_hash_is_remembered_by_path_size_and_mtime(tmp_path):
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"abc")
    memo = tmp_path / "memo.json"
    assert provenance.cached_file_sha256(f, memo) == hashlib.sha256(b"abc").hexdigest()
    assert memo.exists()
    # a remembered hash is returned without reading the file: prove it by changing the bytes, keeping size and mtime
    st = f.stat()
    f.write_bytes(b"xyz")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert provenance.cached_file_sha256(f, memo) == hashlib.sha256(b"abc").hexdigest()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a newer mtime: hashed again
    assert provenance.cached_file_sha256(f, memo) == hashlib.sha256(b"xyz").hexdigest()


def test_git_revision_outside_a_checkout_is_none(tmp_path):
    assert provenance.git_revision(tmp_path) == {"revision": None, "dirty": None}


def test_seeds_name_the_allocation_and_search_seeds():
    assert provenance.seeds_of(3, {"method": "msp", "seed": None, "search": {"seed": 7}}) == {
        "seed": 3, "allocation.seed": None, "allocation.search.seed": 7}


def test_each_embedded_model_names_its_own_weight_file(monkeypatch, tmp_path):
    """The embedded GGUF models are hashed by their own file: Gemma-3's assembled GGUF, not SmolLM2's."""
    import msp.embedded_gemma as eg
    import msp.models as models

    monkeypatch.setattr(eg, "embedded_gemma_path", lambda cache_dir=None: (tmp_path, "gemma.gguf"))
    monkeypatch.setattr(models, "embedded_smollm2_path", lambda: (tmp_path / "s", "smollm2.gguf"))
    assert provenance.weight_files("gemma3-270m", "auto") == [tmp_path / "gemma.gguf"]
    assert provenance.weight_files("smollm2-135m", "auto") == [tmp_path / "s" / "smollm2.gguf"]
    assert provenance.weight_files("tiny-llama", "auto") == []
