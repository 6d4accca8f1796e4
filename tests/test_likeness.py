"""evaluate.py --metrics likeness (issue 26): do a --cond-embed model's samples look like their reference faces?

The maths (cosines, the judge's agreement, chance, the real pairs, the held-out pool, the judge's best attributes) on
toy inputs; then a real pipeline on a copy of the 32 px shards: a small judge (judge.py), its embeddings (embed.py),
4 steps of `train.py --cond-embed`, and one evaluation whose eval.json is checked for its layout, its ranges, chance
from the judge's data rates and one reference's cosines recomputed by hand. No learned quality is asserted: the
models are trained for a few steps only.

Two choices make the hand check able to fail: the judge trains for 3 epochs at width 8 (after 1 epoch at width 4 its
features give any two faces a cosine of 0.99998, so every number agrees with every other to 5 digits), and the
trained checkpoint is "woken" (wake) so that its samples answer the reference: after 4 steps its zero-initialised
output layer is still ~1e-3 and a sample changes by 1e-5 from one reference to another."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import config
import embed
import evaluate
import judge as judge_mod
import sample
from evaluate import EvalConfig, EvalError
from tiny_run import REPO, conditional_run, one_thread_env
from utills import load_model

pytestmark = pytest.mark.usefixtures("one_thread")

REFS, N, PAIRS = 3, 2, 50  # 3 references x 2 samples; 50 of the valid split's 190 pairs (the random draw)


def likeness_cfg(run: Path, **kw) -> EvalConfig:
    return EvalConfig(**{"ckpt": str(run), "metrics": "likeness", "likeness_refs": REFS, "likeness_n": N,
                         "likeness_guidance": "1,3", "likeness_pairs": PAIRS, "steps": 3, "batch_size": 4,
                         "device": "cpu", **kw})


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory, shards: Path) -> tuple[Path, Path]:
    """(shards with judge.pt and the judge's embeddings, a 4-step `train.py --cond-embed` run on them)."""
    base = tmp_path_factory.mktemp("likeness")
    data = base / "shards"
    shutil.copytree(shards, data)  # the session's shards are shared: the judge and the embeddings go to a copy
    judge_mod.train(judge_mod.JudgeConfig(data=str(data), width=8, epochs=3, batch_size=16, device="cpu"))
    embed.main(embed.EmbedConfig(data=str(data), encoder="judge", device="cpu"))
    run = base / "run"
    cmd = [sys.executable, str(REPO / "train.py"), "--data", str(data), "--out", str(run), "--preset", "tiny",
           "--cond-embed", "--steps", "4", "--batch-size", "4", "--device", "cpu", "--loader", "torch",
           "--warmup", "1", "--sample-every", "0", "--log-every", "1", "--seed", "0"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=one_thread_env())
    assert proc.returncode == 0, f"train.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    wake(run / "checkpoints" / "step-00000004.pt")
    return data, run


def wake(path: Path) -> None:
    """Make a few-step --cond-embed checkpoint answer its reference, in the weights and in the EMA: the output conv
    drawn at 0.05 (as tiny_run.conditional_run does for its untrained model) and the reference MLP's output x30."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    shadow = dict(zip(ckpt["ema"]["param_names"], ckpt["ema"]["shadow_params"]))
    for weights in (ckpt["model"], shadow):
        out = weights["out.2.weight"]
        out.copy_(torch.randn(out.shape, generator=torch.Generator().manual_seed(0)) * 0.05)
        for name in ("embed_mlp.3.weight", "embed_mlp.3.bias"):
            weights[name].mul_(30)
    torch.save(ckpt, path)


@pytest.fixture(scope="module")
def evaluated(pipeline: tuple[Path, Path]) -> dict:
    """One likeness evaluation with the judge (RUN/eval.json, RUN/eval-likeness.md)."""
    data, run = pipeline
    result = evaluate.main(likeness_cfg(run, judge=str(data / "judge.pt")))
    assert json.loads((run / "eval.json").read_text())["likeness"] == result["likeness"]
    return result


# ------------------------------------------------------------------------------------------------ the maths

def test_cosines_and_agreement_on_toy_tensors():
    refs = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    samples = torch.tensor([[[2.0, 0.0], [1.0, 1.0], [-3.0, 0.0]],
                            [[0.0, 0.5], [3.0, 4.0], [0.0, 0.0]]])
    s2 = 2 ** -0.5
    expected = torch.tensor([[1.0, s2, -1.0], [1.0, 0.8, 0.0]], dtype=torch.float64)
    got = evaluate.likeness_cosines(refs, samples)
    assert got.dtype == torch.float64 and got.shape == (2, 3)
    torch.testing.assert_close(got, expected)
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    torch.testing.assert_close(evaluate.pair_cosines(emb, [(0, 1), (0, 2), (2, 1)]),
                               torch.tensor([0.0, s2, s2], dtype=torch.float64))

    # Reference 0 reads (1, 0, 1), reference 1 reads (0, 0, 1); two samples each.
    ref_attrs = torch.tensor([[1, 0, 1], [0, 0, 1]], dtype=torch.bool)
    sample_attrs = torch.tensor([[[1, 0, 0], [1, 1, 1]],
                                 [[1, 0, 1], [0, 0, 1]]], dtype=torch.bool)
    # Attribute 0: agree 1, 1, 0, 1 -> 3/4; attribute 1: 1, 0, 1, 1 -> 3/4; attribute 2: 0, 1, 1, 1 -> 3/4.
    torch.testing.assert_close(evaluate.agreement(ref_attrs, sample_attrs),
                               torch.tensor([0.75, 0.75, 0.75], dtype=torch.float64))
    assert evaluate.agreement(ref_attrs, ref_attrs[:, None, :]).tolist() == [1.0, 1.0, 1.0]
    assert evaluate.agreement(ref_attrs, ~ref_attrs[:, None, :]).tolist() == [0.0, 0.0, 0.0]
    torch.testing.assert_close(evaluate.chance_agreement(torch.tensor([0.0, 0.5, 0.1, 1.0], dtype=torch.float64)),
                               torch.tensor([1.0, 0.5, 0.82, 1.0], dtype=torch.float64))


def test_real_pairs_are_distinct_fixed_and_all_when_fewer():
    pairs = evaluate.real_pairs(20, 50)
    assert len(pairs) == len(set(pairs)) == 50
    assert all(0 <= i < j < 20 for i, j in pairs)
    assert pairs == evaluate.real_pairs(20, 50)  # a fixed set
    assert pairs != evaluate.real_pairs(20, 50, seed=1)
    assert evaluate.real_pairs(4, 256) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert evaluate.real_pairs(5, 10) == [(i, j) for i in range(5) for j in range(i + 1, 5)]
    with pytest.raises(EvalError, match="needs 2"):
        evaluate.real_pairs(1, 256)


def test_held_out_pool_falls_back_from_valid_to_test_to_the_end_of_train():
    def manifest(**counts):
        return {"splits": {s: {"count": c} for s, c in counts.items()}}

    assert evaluate.held_out_pool(manifest(train=100, valid=20, test=30), 16) == ("valid", 0, 20)
    assert evaluate.held_out_pool(manifest(train=100, valid=0, test=30), 16) == ("test", 0, 30)
    assert evaluate.held_out_pool(manifest(train=1000), 16) == ("train", 900, 100)  # the last tenth
    assert evaluate.held_out_pool(manifest(train=100), 16) == ("train", 84, 16)  # at least the references
    assert evaluate.held_out_pool(manifest(train=5), 16) == ("train", 0, 5)
    with pytest.raises(EvalError, match="no valid, test or train faces"):
        evaluate.held_out_pool(manifest(train=0), 16)


def test_best_attributes_at_least_eight_in_the_judges_order():
    names = [f"a{i}" for i in range(12)]
    acc = dict(zip(names, [0.5, 0.95, 0.6, 0.91, 0.7, 0.92, 0.93, 0.94, 0.96, 0.97, 0.98, 0.55]))
    judge = SimpleNamespace(attributes=names, balanced_accuracy=acc)
    assert evaluate.best_attributes(judge) == ["a1", "a3", "a5", "a6", "a7", "a8", "a9", "a10"]  # 8 at >= 0.9
    acc.update(a1=0.2, a3=0.3)  # 6 qualify: the best 8
    assert evaluate.best_attributes(judge) == ["a2", "a4", "a5", "a6", "a7", "a8", "a9", "a10"]
    acc.update({n: 0.95 for n in names})  # all 12 qualify
    assert evaluate.best_attributes(judge) == names


def test_flags_and_config_checks(tmp_path: Path):
    cfg, _ = config.parse(EvalConfig, ["--ckpt", "RUN", "--metrics", "fid,likeness", "--likeness-refs", "4",
                                       "--likeness-n", "2", "--likeness-guidance", "1,2,4", "--likeness-pairs", "9",
                                       "--data", "D", "--encoder", "E"])
    assert (cfg.likeness_refs, cfg.likeness_n, cfg.likeness_guidance, cfg.likeness_pairs, cfg.data, cfg.encoder) == \
        (4, 2, "1,2,4", 9, "D", "E")
    assert evaluate.likeness_scales(cfg) == [1.0, 2.0, 4.0]
    # --judge with likeness is read by the likeness report; it does not add the attribute report.
    assert evaluate.check_eval_config(EvalConfig(ckpt="RUN", metrics="likeness", judge="J")) == ["likeness"]
    assert evaluate.check_eval_config(EvalConfig(ckpt="RUN", metrics="likeness,attrs", judge="J")) == \
        ["likeness", "attrs"]
    assert evaluate.check_eval_config(EvalConfig(ckpt="RUN", ref="S", metrics="fid", judge="J")) == ["fid", "attrs"]
    for bad in ("", "1,x", "-1", "1,1"):
        with pytest.raises(EvalError, match="--likeness-guidance"):
            evaluate.check_eval_config(EvalConfig(ckpt="RUN", metrics="likeness", likeness_guidance=bad))
    with pytest.raises(config.ConfigError, match="--likeness-n"):
        evaluate.check_eval_config(EvalConfig(ckpt="RUN", metrics="likeness", likeness_n=0))
    with pytest.raises(EvalError, match="no attrs, likeness"):
        evaluate.check_eval_config(EvalConfig(ckpt=str(tmp_path), ref="S", metrics="fid,likeness",
                                              phema_sweep="0.05,0.1"))


def test_a_model_without_reference_embedding_is_a_one_line_error(tmp_path_factory: pytest.TempPathFactory,
                                                                  tmp_path: Path):
    run = conditional_run(tmp_path_factory)  # attribute-conditional, no --cond-embed
    with pytest.raises(SystemExit) as e:
        evaluate.cli(["--ckpt", str(run), "--metrics", "likeness", "--device", "cpu", "--out",
                      str(tmp_path / "eval.json")])
    message = str(e.value)
    assert message.startswith("error: ") and "\n" not in message
    assert "--metrics likeness needs a model trained with --cond-embed" in message
    assert not (tmp_path / "eval.json").exists()


# ------------------------------------------------------------------------------------------------ end to end

def test_likeness_report_layout_and_ranges(evaluated: dict, pipeline: tuple[Path, Path]):
    data, run = pipeline
    rep = evaluated["likeness"]
    assert {"fid", "kid_mean", "attributes"}.isdisjoint(evaluated)  # only what was asked for
    manifest = json.loads((data / "manifest.json").read_text())
    assert rep["split"] == "valid" and rep["pool"] == {"first": 0, "count": manifest["splits"]["valid"]["count"]}
    assert (rep["refs"], rep["n"], rep["guidance"], rep["pairs"]) == (REFS, N, [1.0, 3.0], PAIRS)
    assert rep["reference_index"] == list(range(REFS)) and len(rep["reference_keys"]) == REFS
    for key, index in zip(rep["reference_keys"], rep["reference_index"]):
        assert embed.shard_image(data, key)[1:] == ("valid", index)
    assert rep["data"] == str(data.resolve())
    assert rep["sampler"]["steps"] == 3 and rep["sampler"]["sampler"] == "ddim" and rep["sampler"]["seed"] == 0
    assert rep["encoder"]["kind"] == "judge" and rep["encoder"]["dim"] == 64  # width 8: 8 * 8 features
    assert rep["encoder"]["sha256"] == load_model(run).embedding["encoder"]["sha256"]

    cos = rep["cosine"]
    assert set(cos["conditioned"]) == {"1", "3"}
    for stats in [*cos["conditioned"].values(), cos["unconditional"]]:
        assert len(stats["per_reference"]) == REFS
        assert all(-1 <= v <= 1 for v in [stats["mean"], *stats["per_reference"]])
        assert stats["mean"] == pytest.approx(sum(stats["per_reference"]) / REFS, abs=2e-6)
        assert 0 <= stats["std"] <= 2
    assert -1 <= cos["real_pairs"]["mean"] <= 1 and cos["real_pairs"]["pairs"] == PAIRS

    j = rep["judge"]
    loaded_judge = judge_mod.load_judge(data / "judge.pt")
    assert j["file"] == str(data / "judge.pt")
    assert j["best_attributes"] == evaluate.best_attributes(loaded_judge) and len(j["best_attributes"]) >= 8
    assert list(j["per_attribute"]) == loaded_judge.attributes
    for name, subset in (("all", loaded_judge.attributes), ("best", j["best_attributes"])):
        summary = j["agreement"][name]
        assert summary["attributes"] == len(subset)
        # Chance, recomputed from the judge file's data rates: p^2 + (1-p)^2, averaged over the attributes.
        chances = [p * p + (1 - p) * (1 - p) for p in (loaded_judge.data_rate[a] for a in subset)]
        assert summary["chance"] == round(sum(chances) / len(chances), 6)
        for label in ("1", "3"):
            shares = [j["per_attribute"][a]["conditioned"][label] for a in subset]
            assert summary["conditioned"][label] == pytest.approx(sum(shares) / len(shares), abs=2e-6)
        assert 0 <= summary["unconditional"] <= 1
    for a, m in j["per_attribute"].items():
        p = loaded_judge.data_rate[a]
        assert m["chance"] == round(p * p + (1 - p) * (1 - p), 6)
        assert m["data_rate"] == round(p, 6) and m["balanced_accuracy"] == round(loaded_judge.balanced_accuracy[a], 6)
        # R * N pairs per setting (R * R * N for the unconditional ones): shares on that grid, in [0, 1].
        for share, pairs in [*((v, REFS * N) for v in m["conditioned"].values()), (m["unconditional"], REFS ** 2 * N)]:
            assert 0 <= share <= 1
            assert share * pairs == pytest.approx(round(share * pairs), abs=1e-4)

    md = (run / "eval-likeness.md").read_text()
    assert "cosine similarity" in md and "chance" in md and rep["reference_keys"][0] in md
    history = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert history[-1]["likeness"] == rep


def test_a_reference_cosine_recomputed_by_hand(evaluated: dict, pipeline: tuple[Path, Path]):
    """Reference 0's reported cosines at w=1 and 3 from the public pieces: its shard image, the encoder the
    checkpoint names, sample.py's images 0..N-1 (the noise of reference 0) with its embedding, cos = a.b / |a||b|;
    and they differ from the same with reference 1's embedding and from the unconditional samples."""
    data, run = pipeline
    rep = evaluated["likeness"]
    loaded = load_model(run, device="cpu")
    encoder = embed.encoder_for(loaded.embedding, "", data, "cpu")
    image, split, _ = embed.shard_image(data, rep["reference_keys"][0])
    ref = encoder(image[None])[0]
    other = encoder(embed.shard_image(data, rep["reference_keys"][1])[0][None])[0]

    def mean_cosine(scfg: sample.SampleConfig, like: torch.Tensor | None) -> float:
        samples = encoder(sample.sample_images(loaded, scfg, 0, N, ref=like)).double()
        a = ref.double()
        return sum(float(a @ s / (a.norm() * s.norm())) for s in samples) / N

    for w in ("1", "3"):
        scfg = sample.SampleConfig(ckpt=str(run), steps=3, batch_size=N, device="cpu", guidance=float(w))
        reported = rep["cosine"]["conditioned"][w]["per_reference"][0]
        assert reported == pytest.approx(mean_cosine(scfg, ref), abs=2e-6)
        assert abs(reported - mean_cosine(scfg, other)) > 1e-4
    unconditional = mean_cosine(sample.SampleConfig(ckpt=str(run), steps=3, batch_size=N, device="cpu"), None)
    assert abs(rep["cosine"]["conditioned"]["1"]["per_reference"][0] - unconditional) > 1e-4


def test_without_a_judge_the_agreement_is_skipped_and_the_cosines_repeat(evaluated: dict,
                                                                         pipeline: tuple[Path, Path],
                                                                         tmp_path: Path):
    _, run = pipeline
    out = tmp_path / "eval.json"
    result = evaluate.main(likeness_cfg(run, out=str(out)))
    rep = result["likeness"]
    assert rep["judge"] is None and "--judge" in rep["judge_note"]
    assert rep["cosine"] == evaluated["likeness"]["cosine"]  # fixed seeds: the same numbers again
    assert json.loads(out.read_text())["likeness"] == rep
    assert "--judge" in (tmp_path / "eval-likeness.md").read_text()
