"""cpu-fp32: the optimized program as a torch.export archive; numbers and the save/load round trip."""

from __future__ import annotations

import json

import pytest
import torch

from graphopt.compiler import load_artifact
from graphopt.errors import ArtifactError
from graphopt.program import flatten_outputs

ZOO = ["resnet18", "mobilenet_v2", "shufflenet_v2", "densenet", "se_resnet", "inception", "digits_cnn"]


@pytest.mark.parametrize("name", ZOO)
def test_matches_the_original_and_round_trips(lowered_zoo, name, tmp_path):
    model, program, artifact, samples = lowered_zoo(name, "cpu-fp32")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in program.graph_module.modules())  # folded by the pipeline
    artifact.save(tmp_path / "art")
    loaded = load_artifact(tmp_path / "art")
    assert loaded.target == "cpu-fp32" and [s.shape for s in loaded.input_specs] == [samples[0][0].shape]
    with torch.inference_mode():
        for (x,) in samples:
            want = flatten_outputs(model(x.clone()))
            got, again = flatten_outputs(artifact.run(x.clone())), flatten_outputs(loaded.run(x.clone()))
            for w, g, a in zip(want, got, again, strict=True):
                torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)  # BN folding: float rounding only
                assert torch.equal(a, g)  # the archive on disk computes exactly what was lowered


def test_manifest_lists_its_files_and_a_missing_archive_is_one_line(lowered_zoo, tmp_path):
    artifact = lowered_zoo("digits_cnn", "cpu-fp32")[2]
    artifact.save(tmp_path / "art")
    manifest = json.loads((tmp_path / "art" / "artifact.json").read_text())
    assert manifest["files"] == ["model.pt2"] and manifest["inputs"][0]["dtype"] == "float32"
    (tmp_path / "art" / "model.pt2").unlink()
    with pytest.raises(ArtifactError, match="is missing model.pt2"):
        load_artifact(tmp_path / "art")


def test_a_truncated_archive_is_an_artifact_error(lowered_zoo, tmp_path):
    lowered_zoo("digits_cnn", "cpu-fp32")[2].save(tmp_path / "art")
    path = tmp_path / "art" / "model.pt2"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ArtifactError) as info:
        load_artifact(tmp_path / "art")
    assert "\n" not in str(info.value) and "model.pt2" in str(info.value)
