"""The token-order study (`nativetok compare`, docs/study.md): order controls, paired statistics, the decision
rule, the presets, and a whole tiny study on real data."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from nativetok.config.loading import load_preset
from nativetok.config.schema import GeneratorConfig, SamplingConfig
from nativetok.eval.statistics import PairedDifference
from nativetok.eval.token_metrics import sequence_statistics
from nativetok.models.generator import build_generator, generation_order
from nativetok.pipelines.compare import verdict

from .conftest import REPO, TINY


def small_generator(order: str, seed: int = 0):
    torch.manual_seed(0)
    config = GeneratorConfig(codebook_size=32, num_tokens=8, width=32, depth=1, heads=2, token_order=order,
                             order_seed=seed)
    return build_generator(config, num_classes=10).eval()


def test_reversing_twice_returns_the_tokens_and_every_order_is_a_permutation():
    tokens = torch.randint(0, 32, (5, 8))
    reversed_generator = small_generator("reversed")
    once = reversed_generator.to_generation_order(tokens)
    assert torch.equal(once, tokens.flip(1))
    assert torch.equal(reversed_generator.to_generation_order(once), tokens)
    for order in ("forward", "reversed", "permuted"):
        generator = small_generator(order)
        assert torch.equal(generator.to_tokenizer_order(generator.to_generation_order(tokens)), tokens)
        assert sorted(generator.order.tolist()) == list(range(8))
    permutation = generation_order(8, "permuted", 1234)
    assert torch.equal(permutation, generation_order(8, "permuted", 1234))  # fixed by its seed
    assert not torch.equal(permutation, torch.arange(8))
    assert not torch.equal(permutation, generation_order(8, "permuted", 1))


def test_a_permuted_generator_models_the_permuted_sequence_and_keeps_its_checkpoint_keys():
    tokens, labels = torch.randint(0, 32, (4, 8)), torch.tensor([0, 1, 2, 3])
    permuted, forward = small_generator("permuted", 7), small_generator("forward")
    forward.load_state_dict(permuted.state_dict())  # the order is not part of the weights
    assert list(permuted.state_dict()) == list(forward.state_dict())
    loss, per_position = permuted.loss(tokens, labels)
    same, same_per_position = forward.loss(tokens[:, permuted.order], labels)
    torch.testing.assert_close(loss, same)
    torch.testing.assert_close(per_position, same_per_position)
    assert not torch.allclose(forward.loss(tokens, labels)[1], per_position)


def test_a_permuted_generator_samples_valid_images(tiny_config):
    """Sampled ids come back in the tokenizer's order, inside the codebook, and decode to images."""
    from nativetok.models.tokenizer import build_tokenizer

    config = tiny_config()
    tokenizer = build_tokenizer(config.tokenizer, config.data.image_size, config.data.channels).eval()
    generator = small_generator("permuted", 3)
    labels = torch.arange(10)
    ids = generator.sample(labels, SamplingConfig(cfg_scale=2.0), seed=0)
    assert ids.shape == (10, 8) and int(ids.min()) >= 0 and int(ids.max()) < 32
    raw = generator.sample_tokens(labels, seed=0, graph=None, compile=False, cfg_scale=2.0, cfg_schedule="constant",
                                  temperature=1.0, top_k=0, top_p=1.0)
    assert torch.equal(ids, raw[:, generator.inverse_order])  # generated in its order, returned in the tokenizer's
    images = tokenizer.decode(ids)
    assert images.shape == (10, 1, 32, 32) and torch.isfinite(images).all()
    assert float(images.min()) >= 0 and float(images.max()) <= 1


def test_paired_differences_give_the_t_interval():
    from scipy.stats import t

    a, b = [10.0, 12.0, 11.0], [12.0, 13.8, 13.2]
    difference = PairedDifference.of(a, b)
    values = [-2.0, -1.8, -2.2]
    mean = sum(values) / 3
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / 2)
    half = t.ppf(0.975, 2) * sd / math.sqrt(3)
    low, high = difference.interval()
    assert math.isclose(low, mean - half, rel_tol=1e-9) and math.isclose(high, mean + half, rel_tol=1e-9)
    assert math.isclose(t.ppf(0.975, 2), 4.303, rel_tol=1e-3)
    assert difference.sign() == -1 and PairedDifference.of(b, a).sign() == 1
    assert PairedDifference.of([1.0, 2.0, 3.0], [2.0, 1.0, 3.0]).sign() == 0
    assert PairedDifference.of([1.0], [2.0]).sign() == 0  # one seed decides nothing
    with pytest.raises(ValueError, match="same seeds"):
        PairedDifference.of([1.0, 2.0], [1.0])


def test_the_decision_rule_of_docs_study():
    better = PairedDifference.of([1.0, 1.1, 0.9], [2.0, 2.2, 2.1])
    worse = PairedDifference.of([2.0, 2.2, 2.1], [1.0, 1.1, 0.9])
    tie = PairedDifference.of([1.0, 2.0, 3.0], [2.0, 1.0, 3.0])
    keys = ("nativetok - parallel", "nativetok - reversed", "nativetok - permuted")
    assert verdict(dict(zip(keys, [better] * 3))) == "supported"
    assert verdict(dict(zip(keys, [worse] * 3))) == "refuted"
    assert verdict(dict(zip(keys, [better, better, tie]))) == "undecided"
    assert verdict(dict(zip(keys, [worse, better, better]))) == "undecided"
    assert verdict(dict(zip(keys[:2], [better] * 2))).startswith("undecided")
    assert verdict({}).startswith("none")  # a preset of other arms (growth_init) has no verdict


def test_sequence_statistics_count_repeats_and_distinct_ids():
    tokens = torch.tensor([[1, 1, 1, 1], [1, 2, 3, 4]])
    stats = sequence_statistics(tokens, codebook_size=8)
    assert math.isclose(stats["adjacent_repeat_rate"], 3 / 6)
    assert math.isclose(stats["distinct_ids_per_image"], (1 + 4) / 2)
    assert math.isclose(stats["codebook_usage"], 4 / 8)


def test_the_presets_load_and_bad_ones_are_refused(tmp_path):
    default = load_preset(REPO / "experiments" / "compare" / "default.yaml")
    assert len(default.seeds) >= 3 and {"nativetok", "parallel", "reversed", "permuted"} <= set(default.arms)
    assert default.arms["reversed"].tokenizer == "nativetok" and default.arms["permuted"].order == "permuted"
    assert "growth.stages=[]" in default.tokenizer and "tokenizer.decoder.random_prefix=0" in default.tokenizer
    for path in sorted((REPO / "experiments" / "compare").glob("*.yaml")):
        load_preset(path)
    longer = load_preset(REPO / "experiments" / "compare" / "generator_budget.yaml")  # only its generators differ
    assert (longer.tokenizer, longer.tokenizers, longer.arms) == (default.tokenizer, default.tokenizers, default.arms)
    assert "trainer.max_steps=3000" in longer.generator and "trainer.max_steps=1000" in default.generator
    bad = tmp_path / "bad.yaml"
    cases = {
        "seeds: [1, 1]\n": "seeds: needs distinct seeds",
        "imagez: 10\n": "unknown key 'imagez'",
        "tokenizers: {a: []}\narms: {x: {tokenizer: b}}\n": "arms.x.tokenizer: 'b' is not one of",
        "tokenizers: {a: []}\narms: {x: {tokenizer: a, order: sideways}}\n": "arms.x.order: 'sideways'",
        "tokenizers: {a: []}\narms: {x: {tokenizer: a}}\nsamples: 1\n": "samples: needs at least 2",
        "tokenizers: {a: []}\narms: {x: {tokenizer: a}}\npaired: [[x, y]]\n": r"paired: \['x', 'y'\] must name two",
    }
    for text, message in cases.items():
        bad.write_text(text)
        with pytest.raises(Exception, match=message):
            load_preset(bad)


def test_a_tiny_study_runs_every_arm_pairs_seeds_and_resumes(tmp_path, fmnist_index):
    """Every arm with two seeds on real data at tiny sizes, computed in two lanes: the order arms reuse NativeTok's
    shards, every measurement and artefact is written, and a second run (in this process) reuses every cell."""
    from nativetok.pipelines.compare import compare

    (tmp_path / "tok.yaml").write_text(f"extends: {REPO / 'experiments' / 'fmnist_tiny.yaml'}\n")
    (tmp_path / "gen.yaml").write_text(f"extends: {REPO / 'experiments' / 'fmnist_tiny_ar.yaml'}\n")
    preset = {
        "tokenizer_experiment": "tok.yaml", "generator_experiment": "gen.yaml", "seeds": [0, 1],
        "tokenizer": TINY + [f"data.index={fmnist_index}", "trainer.max_steps=5", "trainer.val_every_n_steps=2",
                             "tokenizer.decoder.random_prefix=0"],
        "generator": ["generator.width=32", "generator.depth=1", "generator.heads=2", "data.batch_size=16",
                      "data.num_workers=0", "data.val_samples=20", "data.hflip=false", "trainer.max_steps=2",
                      "trainer.val_every_n_steps=1", "trainer.images_every_n_steps=0", "sampling.grid_per_class=1"],
        "tokenizers": {"nativetok": ["tokenizer.kind=nativetok"], "parallel": ["tokenizer.kind=parallel"]},
        "arms": {"nativetok": {"tokenizer": "nativetok"}, "parallel": {"tokenizer": "parallel"},
                 "reversed": {"tokenizer": "nativetok", "order": "reversed"},
                 "permuted": {"tokenizer": "nativetok", "order": "permuted"}},
        "paired": [["parallel", "reversed"]],
        "generator_images": 60, "selection_images": 20, "evaluation_images": 30, "samples": 20,
    }
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(preset))
    report = compare(str(tmp_path / "tiny.yaml"), tmp_path / "out", jobs=2)
    folder = tmp_path / "out" / "tiny"
    assert (report["lanes"], report["cells_computed"], report["cells"]) == (2, 12, 12)
    assert report["seeds"] == [0, 1] and report["verdict"].startswith(("supported", "refuted", "undecided"))
    assert set(report["differences"]) == {"nativetok - parallel", "nativetok - reversed", "nativetok - permuted"}
    paired = report["paired"]["parallel - reversed"]  # its tokenizers' metrics too, paired by seed
    assert set(paired) == {"fd_vs_reconstructions", "bits_per_token", "psnr", "adjacent_repeat_rate",
                           "distinct_ids_per_image"}
    assert paired["psnr"]["values"] == pytest.approx([report["tokenizers"]["parallel"][s]["psnr"]
                                                      - report["tokenizers"]["nativetok"][s]["psnr"] for s in (0, 1)])
    index = json.loads((folder / "data" / "index.json").read_text())
    assert {k: sum(s["samples"] for s in v["shards"]) for k, v in index["splits"].items()} == {
        "train": 60, "val": 20, "eval": 30}
    for seed in (0, 1):
        native = report["tokenizers"]["nativetok"][seed]
        assert native["steps"] == 5 and native["psnr_curve"][-1][0] == 4  # steps trained, not the last validation
        assert native["psnr_curve"] and native["plateaued"] in (True, False) and set(native["fd_at_k"]) == {
            "1", "2", "4", "8"}
        assert 0 <= native["adjacent_repeat_rate"] <= 1 and native["codebook_usage"] > 0
        for arm in ("nativetok", "reversed", "permuted"):  # the order controls read NativeTok's very shards
            cell = json.loads((folder / "arms" / arm / f"seed{seed}" / "cell.json").read_text())
            assert cell["inputs"]["tokenizer"]["tokens"] == native["tokens"]
        for runs in report["arms"].values():
            run = runs[seed]
            assert run["seed"] == seed and run["samples"] == 20 and len(run["bits_per_position"]) == 8
            assert run["fd_vs_reconstructions"] >= 0 and 0 <= run["class_accuracy"] <= 1
            assert "best-step" in run["checkpoint"]
    orders = [yaml.safe_load((folder / "arms" / arm / "seed0" / "generator" / "config.yaml").read_text())
              ["generator"]["token_order"] for arm in ("nativetok", "reversed", "permuted")]
    assert orders == ["forward", "reversed", "permuted"]
    for name in ("study.md", "study.json", "bits_per_position.png", "fd_at_k.png", "tokenizer_psnr.png"):
        assert (folder / name).is_file()
    assert "Verdict (docs/study.md)" in (folder / "study.md").read_text()
    # Run again: every cell is reused (no training, same numbers).
    again = compare(str(tmp_path / "tiny.yaml"), tmp_path / "out")
    assert again["differences"] == json.loads(json.dumps(report["differences"]))
    assert (again["lanes"], again["cells_computed"]) == (1, 0) and "0 of 12 cells" in (folder / "study.md").read_text()
    # A changed preset is refused for a finished cell, not silently reused.
    preset["samples"] = 30
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(preset))
    with pytest.raises(ValueError, match="other inputs"):
        compare(str(tmp_path / "tiny.yaml"), tmp_path / "out")


def test_a_new_schema_key_at_its_default_keeps_a_finished_cell_and_any_changed_value_refuses_it():
    from nativetok.pipelines.compare import changed_inputs, schema_defaults

    made = schema_defaults()
    saved = {"config": json.loads(json.dumps(made)), "samples": 20}
    del saved["config"]["generator"]["order_seed"]  # recorded before the schema had this key
    saved["config"]["trainer"]["retired_option"] = 3  # a key the schema has since lost
    assert changed_inputs(saved, {"config": made, "samples": 20}) == []
    seeded = json.loads(json.dumps(made))
    seeded["generator"]["order_seed"] += 1  # a new key away from its default changes what the cell computes
    seeded["optim"]["lr"] *= 2
    assert changed_inputs(saved, {"config": seeded, "samples": 30}) == [
        "config.generator.order_seed", "config.optim.lr", "samples"]


def test_a_cell_records_only_the_sections_its_stage_reads_so_a_generator_change_keeps_finished_tokenizers():
    from nativetok.config.schema import ExperimentConfig
    from nativetok.pipelines.compare import changed_inputs, read_sections, schema_defaults

    tokenizer = read_sections(ExperimentConfig(stage="tokenizer"))
    generator = read_sections(ExperimentConfig(stage="generator"))
    assert "generator" not in tokenizer and "sampling" not in tokenizer and "tokenizer" in tokenizer
    assert {"tokenizer", "loss", "growth"}.isdisjoint(generator) and "generator" in generator
    recorded = schema_defaults()  # recorded whole (as cells made before were), the generator since changed
    recorded["generator"]["codebook_size"] = 4096
    assert changed_inputs({"config": recorded}, {"config": tokenizer}) == []
    recorded["tokenizer"]["num_tokens"] += 1  # what the tokenizer reads still counts
    assert changed_inputs({"config": recorded}, {"config": tokenizer}) == ["config.tokenizer.num_tokens"]


def lane_start_method() -> str:
    import multiprocessing

    return multiprocessing.get_start_method()


def test_a_lane_starts_its_data_workers_as_the_platform_does_not_by_spawning_again():
    import multiprocessing

    from nativetok.pipelines.compare import lanes

    platform_default = multiprocessing.get_context().get_start_method()
    with lanes(2) as pool:
        assert pool.submit(lane_start_method).result() == platform_default
