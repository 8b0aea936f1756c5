"""`nativetok ablate`: variants x seeds on real data, prefix PSNR, mean ± sd, verdicts against the reference."""

from __future__ import annotations

import json

import pytest
import yaml

from nativetok.config.checks import ConfigError
from nativetok.config.loading import load_ablation
from nativetok.pipelines.ablation import ablate

from .conftest import REPO, TINY


def test_the_shipped_ablation_loads_and_bad_presets_are_refused(tmp_path):
    preset = load_ablation(REPO / "experiments" / "ablation" / "hnt.yaml")
    assert len(preset.seeds) >= 3 and preset.reference in preset.variants
    assert {"all_experts_from_start", "hnt_2_stages", "hnt_codebook_trained_in_growth"} <= set(preset.variants)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"experiment": str(REPO / "experiments" / "fmnist_tiny.yaml"),
                                   "reference": "a", "variants": {"b": ["growth.stages=[]"]}}))
    with pytest.raises(ConfigError, match="reference: 'a' is not one of the variants b"):
        load_ablation(bad)
    bad.write_text(yaml.safe_dump({"experiment": str(REPO / "experiments" / "fmnist_tiny.yaml"),
                                   "reference": "a", "variants": {"a": ["tokenizer.widht=3"]}}))
    with pytest.raises(ConfigError, match="variant 'a'.*widht"):
        load_ablation(bad)


def test_ablate_trains_every_variant_and_seed_and_reports_prefix_psnr(tmp_path, fmnist_index):
    preset = {
        "experiment": str(REPO / "experiments" / "fmnist_tiny.yaml"), "seeds": [0, 1], "images": 40,
        "common": [o for o in TINY if not o.startswith("growth")] + [
            f"data.index={fmnist_index}", "trainer.max_steps=4", "trainer.val_every_n_steps=4"],
        "reference": "hnt",
        "variants": {"hnt": ["growth.stages=[{step: 0, experts: 4}, {step: 2, experts: 8, train: [decoder]}]"],
                     "flat": ["growth.stages=[]"]},
    }
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(preset, sort_keys=False))
    results = ablate(str(tmp_path / "tiny.yaml"), tmp_path / "out")
    assert list(results) == ["hnt", "flat"]
    for runs in results.values():
        assert [r["seed"] for r in runs] == [0, 1]
        assert all(list(r["psnr"]) == ["1", "2", "4", "8"] and r["images"] == 40 for r in runs)
    assert results["hnt"][0]["psnr"] != results["hnt"][1]["psnr"]  # the seeds really differ
    folder = tmp_path / "out" / "tiny"
    table = (folder / "ablation.md").read_text()
    assert "seeds [0, 1]" in table and "- flat: k=1:" in table and " ± " in table
    assert (folder / "prefix_psnr.png").is_file()
    assert json.loads((folder / "ablation.json").read_text())["flat"][1]["seed"] == 1
    again = ablate(str(tmp_path / "tiny.yaml"), tmp_path / "out")  # finished runs and measurements reused
    assert again == results
