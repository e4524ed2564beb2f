"""End-to-end tests of the ``llmdpd`` CLI: fit, resume, collect, config errors, ablations, 2-process DDP."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.plugins.environments import LightningEnvironment
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_only
from lightning_utilities.core.rank_zero import rank_zero_only as utils_rank_zero_only
from torch import Tensor

from llmdpd_pl.callbacks.ema import ActorEMA
from llmdpd_pl.callbacks.rollout_evaluation import RolloutEvaluation
from llmdpd_pl.cli import LLMDPDCLI, LLMDPDTrainer, main
from llmdpd_pl.data.batches import Batch, BatchStream
from llmdpd_pl.data.datamodule import PromptedOfflineDataModule
from llmdpd_pl.data.embeddings import TextEncoder
from llmdpd_pl.data.spec import DatasetSpec, QualityLevel
from llmdpd_pl.module import LLMDPDModule
from tests.model_fixtures import (
    BATCH_SIZE,
    STEPS_PER_EPOCH,
    ModelData,
    bank_module,
    max_abs_diff,
    model_data,
    one_thread,
    state_with_ema,
    write_config,
)

__all__ = ["model_data", "one_thread"]  # fixtures imported for pytest

REPO = Path(__file__).resolve().parents[1]


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.fixture(autouse=True)
def plain_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    """LightningCLI warns when ``args`` is given and ``sys.argv`` holds pytest's own arguments."""
    monkeypatch.setattr(sys, "argv", ["llmdpd"])


def test_fit_writes_checkpoint_and_resumes(model_data: ModelData, tmp_path: Path) -> None:
    config = write_config(tmp_path / "input.yaml", model_data, tmp_path)
    main(["fit", "--config", str(config)])  # max_steps 6: 3 updates
    checkpoints = sorted((tmp_path / "checkpoints").glob("*.ckpt"))
    assert len(checkpoints) == 1, checkpoints
    ckpt = _load(checkpoints[0])
    assert ckpt["global_step"] == 6 and ckpt["llmdpd"]["updates"] == 3
    bank = ckpt["state_dict"]["task_bank._extra_state"]
    assert bank["task_names"] == ["reach", "push", "box-close"] and bank["n_seen"] == 2
    assert bank["llm"]["model"] == "minilm" and len(bank["llm"]["weights"]) == 64  # the LLM's identity
    assert "ActorEMA" in ckpt["callbacks"]
    stream_state = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert stream_state == [{"consumed": 3, "seed": 0, "rank": 0}]
    assert "model:" in (tmp_path / "config.yaml").read_text()  # the resolved config, saved by the CLI

    # Resume from it for 2 more updates (max_steps counts both optimizers' steps).
    main(["fit", "--config", str(config), "--ckpt_path", str(checkpoints[0]), "--trainer.max_steps", "10",
          "--trainer.default_root_dir", str(tmp_path / "resumed")])
    (resumed,) = (tmp_path / "resumed" / "checkpoints").glob("*.ckpt")
    ckpt = _load(resumed)
    assert ckpt["global_step"] == 10 and ckpt["llmdpd"]["updates"] == 5
    first, second = ckpt["callbacks"]["Provenance"]["segments"]  # the first fit's, then the resume's
    assert first["config"]["trainer"]["max_steps"] == 6 and second["config"]["trainer"]["max_steps"] == 10
    assert first["versions"]["lightning"] == second["versions"]["lightning"] is not None


def test_help_says_what_the_tool_is_and_lists_what_a_user_runs(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "{collect,fit,test}" in out and "LLM-Driven Policy Diffusion" in out
    assert "report (" in out and "export (" in out and "Lightning Trainer command line tool" not in out


def test_resume_applies_changed_training_values_and_refuses_the_rest(
    model_data: ModelData, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path / "input.yaml", model_data, tmp_path)
    main(["fit", "--config", str(config)])
    (first,) = (tmp_path / "checkpoints").glob("*.ckpt")
    capsys.readouterr()
    resume = ["fit", "--config", str(config), "--ckpt_path", str(first), "--trainer.max_steps", "10"]
    main([*resume, "--model.eta", "3.0", "--model.gamma", "0.5", "--trainer.default_root_dir",
          str(tmp_path / "r")])  # fmt: skip
    err = capsys.readouterr().err
    assert "model.eta: given 3.0, the checkpoint's is 1.0; applied from this resume on" in err
    assert "model.gamma: given 0.5, the checkpoint's is 0.99; applied from this resume on" in err
    (resumed,) = (tmp_path / "r" / "checkpoints").glob("*.ckpt")
    hparams = _load(resumed)["hyper_parameters"]
    assert (hparams["eta"], hparams["gamma"]) == (3.0, 0.5)
    saved = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())  # what config.yaml records
    assert (saved["model"]["eta"], saved["model"]["gamma"]) == (3.0, 0.5)
    lr = "model.actor_optimizer.init_args.lr"
    for override, key in ((["--model.hidden_dim", "128"], "model.hidden_dim"), ([f"--{lr}", "0.1"], lr)):
        with pytest.raises(SystemExit) as exit_:
            main([*resume, *override, "--trainer.default_root_dir", str(tmp_path / "x")])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and "Traceback" not in err
        assert err.strip().splitlines()[-1].startswith(f"error: {key}: the checkpoint's is ")
        assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("override", [["--model.prompts", "trajectory"], ["--model.prompts", "none"],
                                      ["--model.text_source", "random"]])
def test_ablations_are_config_only(model_data: ModelData, tmp_path: Path, override: list[str]) -> None:
    config = write_config(tmp_path / "config.yaml", model_data, tmp_path)
    main(["fit", "--config", str(config), "--trainer.max_steps", "2", *override])
    (path,) = (tmp_path / "checkpoints").glob("*.ckpt")
    ckpt = _load(path)
    assert ckpt["hyper_parameters"][override[0].removeprefix("--model.")] == override[1]
    weights = ckpt["state_dict"]
    has_text = any(k.startswith("policy.text_head.") for k in weights)
    has_traj = any(k.startswith("policy.traj_encoder.") for k in weights)
    expected = {"trajectory": (False, True), "none": (False, False), "random": (True, True)}[override[1]]
    assert (has_text, has_traj) == expected
    assert ckpt["llmdpd"]["updates"] == 1


def test_collect_builds_datasets_and_embeddings_once(tmp_path: Path, model_data: ModelData) -> None:
    spec = DatasetSpec(root=str(tmp_path / "minari"), levels={"expert": QualityLevel(1, noise_std=0.1)},
                       prompt_episodes=1, max_episode_steps=10, workers=1)
    data = {"seen_tasks": ["reach"], "unseen_tasks": ["push"], "dataset": dataclasses.asdict(spec),
            "cache_dir": str(tmp_path / "embeddings")}
    config = write_config(tmp_path / "collect.yaml", model_data, tmp_path, data=data)
    passes = TextEncoder.total_forward_passes
    main(["collect", "--config", str(config)])
    made = sorted(p.relative_to(spec.root).as_posix() for p in Path(spec.root).glob("llmdpd/*/*/llmdpd.json"))
    assert made == ["llmdpd/push/prompts-v0/llmdpd.json", "llmdpd/reach/prompts-v0/llmdpd.json",
                    "llmdpd/reach/train-v0/llmdpd.json"]
    assert len(list((tmp_path / "embeddings").glob("*.pt"))) == 2  # one text prompt per task
    assert TextEncoder.total_forward_passes > passes
    stamps = {p: p.stat().st_mtime_ns for p in Path(spec.root).rglob("*") if p.is_file()}

    passes = TextEncoder.total_forward_passes
    main(["collect", "--config", str(config)])  # everything present: nothing rebuilt, no LLM pass
    assert TextEncoder.total_forward_passes == passes
    assert {p: p.stat().st_mtime_ns for p in Path(spec.root).rglob("*") if p.is_file()} == stamps


@pytest.mark.parametrize("precision", ["high", "medium"])
def test_float32_matmul_precision_is_set_for_the_run(
    model_data: ModelData, tmp_path: Path, precision: str
) -> None:
    """The option reaches torch (TF32 on NVIDIA GPUs with ``high``) and the saved config."""
    config = write_config(tmp_path / "input.yaml", model_data, tmp_path)
    before = torch.get_float32_matmul_precision()
    try:
        main(["fit", "--config", str(config), "--trainer.max_steps", "2",
              "--float32_matmul_precision", precision])
        assert torch.get_float32_matmul_precision() == precision
    finally:
        torch.set_float32_matmul_precision(before)
    assert f"float32_matmul_precision: {precision}" in (tmp_path / "config.yaml").read_text()


@pytest.mark.parametrize(
    ("override", "names"),
    [
        (["--model.prompts", "bogus"], ["model.prompts", "bogus"]),  # rejected by the parser (Literal)
        (["--data.seen_tasks", "[box-clos]"], ["data.seen_tasks", "box-clos", "box-close"]),  # with a hint
        (["--model.tau", "2"], ["model.tau", "2"]),
        (["--data.batch_size", "0"], ["data.batch_size", "0"]),
        (["--float32_matmul_precision", "tf32"], ["float32_matmul_precision", "tf32"]),
    ],
)
def test_bad_config_value_names_the_field(
    model_data: ModelData, tmp_path: Path, capsys: pytest.CaptureFixture[str], override: list[str],
    names: list[str],
) -> None:
    config = write_config(tmp_path / "config.yaml", model_data, tmp_path)
    with pytest.raises((SystemExit, ValueError)) as info:
        main(["fit", "--config", str(config), *override])
    message = str(info.value) + capsys.readouterr().err
    for name in names:
        assert name in message
    assert not (tmp_path / "checkpoints").exists()


# ----------------------------------------------------------------------------- the shipped configs
# Every config under configs/, but the overlays (a second --config, tested below).
OVERLAYS = ("prompts", "levers")
CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.yaml") if p.parent.name not in OVERLAYS)
PARAPHRASES = REPO / "configs" / "prompts" / "paraphrases.yaml"
SEGMENTS = REPO / "configs" / "levers" / "prompt_segments.yaml"


def _shipped(name: str) -> Path:
    """The shipped config called ``name``, wherever it lies under configs/."""
    return CONFIGS[[c.name for c in CONFIGS].index(name)]


def _instantiate(*configs: Path) -> LLMDPDCLI:
    """Parse the configs and instantiate the trainer, model and datamodule, running nothing."""
    args = [a for c in configs for a in ("--config", str(c))]
    return LLMDPDCLI(LLMDPDModule, PromptedOfflineDataModule, trainer_class=LLMDPDTrainer, run=False,
                     args=args)  # fmt: skip


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.relative_to(REPO / "configs").as_posix())
def test_shipped_config_builds_its_model_and_data(config: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)  # anything a config's relative paths (runs/, data/) would create lands here
    values = yaml.safe_load(config.read_text())
    cli = _instantiate(config)
    model, dm, trainer = cli.model, cli.datamodule, cli.trainer
    assert isinstance(model, LLMDPDModule) and isinstance(dm, PromptedOfflineDataModule)
    for key, value in values["model"].items():  # every model value reaches the module, compile included
        if not key.endswith("_optimizer"):
            assert model.hparams[key] == value, key
    assert model.policy.compile_acting is values["model"].get("compile", False), "compile: not applied"
    for key in ("seen_tasks", "unseen_tasks", "batch_size", "traj_prompt_len"):
        assert getattr(dm, key) == values["data"][key], key
    assert (model.hparams.obs_dim, model.hparams.act_dim) == (dm.obs_dim, dm.act_dim)  # linked
    assert (model.hparams.text_embed_dim, model.hparams.traj_prompt_len) == (dm.text_embed_dim,
                                                                             dm.traj_prompt_len)  # fmt: skip
    (critic_opt, actor_opt), _ = model.configure_optimizers()
    lr = values["model"]["actor_optimizer"]["init_args"]["lr"]
    assert actor_opt.param_groups[0]["lr"] == lr and isinstance(critic_opt, torch.optim.Adam)
    assert trainer.max_steps == values["trainer"]["max_steps"]
    assert any(isinstance(cb, ActorEMA) for cb in trainer.callbacks)
    assert any(isinstance(cb, RolloutEvaluation) for cb in trainer.callbacks)


@pytest.mark.parametrize("name", ["metaworld_cpu.yaml", "p2_ml45_cpu.yaml"])
def test_paraphrases_overlay_replaces_the_text_prompts(name: str, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    base = _shipped(name)
    paraphrases = yaml.safe_load(PARAPHRASES.read_text())["data"]["prompts"]
    plain, overlaid = _instantiate(base).datamodule.prompt_texts(), _instantiate(base, PARAPHRASES).datamodule
    assert set(overlaid.unseen_tasks) <= set(paraphrases)  # every test task is reworded
    for task in overlaid.task_names:
        text = overlaid.prompt_texts()[task]
        if task in paraphrases:
            assert text != plain[task] and all(v in text for v in paraphrases[task].values()), task
        else:
            assert text == plain[task], task  # the rest keep their packaged text


def test_prompt_segments_overlay_sets_the_windows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    base = _shipped("p3_low_quality_targets.yaml")
    cli = _instantiate(base, SEGMENTS)
    for key, value in yaml.safe_load(SEGMENTS.read_text())["data"].items():
        assert getattr(cli.datamodule, key) == value, key
    assert cli.model.hparams.traj_prompt_len == 20 and cli.model.hparams.train_prompt == "random"


@pytest.mark.slow
def test_compiled_fit_runs_and_resumes(model_data: ModelData, tmp_path: Path) -> None:
    """``compile: true``, as every Meta-World config sets it: 2 updates, then a resume for 1 more."""
    config = write_config(tmp_path / "input.yaml", model_data, tmp_path, model={"compile": True},
                          trainer={"max_steps": 4})  # fmt: skip
    main(["fit", "--config", str(config)])
    (first,) = (tmp_path / "checkpoints").glob("*.ckpt")
    main(["fit", "--config", str(config), "--ckpt_path", str(first), "--trainer.max_steps", "6",
          "--trainer.default_root_dir", str(tmp_path / "resumed")])
    (resumed,) = (tmp_path / "resumed" / "checkpoints").glob("*.ckpt")
    before, after = _load(first), _load(resumed)
    assert before["hyper_parameters"]["compile"] is True
    assert (before["global_step"], before["llmdpd"]["updates"]) == (4, 2)
    assert (after["global_step"], after["llmdpd"]["updates"]) == (6, 3)
    weights = [k for k in after["state_dict"] if k.startswith(("policy.", "critic."))]
    assert all(torch.isfinite(after["state_dict"][k]).all() for k in weights)
    moved = [k for k in weights if not torch.equal(after["state_dict"][k], before["state_dict"][k])]
    assert moved == weights  # the resumed update trained every weight


# ----------------------------------------------------------------------------- DDP
def _ddp_by_hand(model_data: ModelData, initial: dict[str, Tensor], updates: int) -> dict[str, Any]:
    """What 2-rank DDP computes, in one process: one replica per rank, each running ``LLMDPDModule.update``
    on its rank's batch stream in its own thread, with its rank's noise (a real ``Trainer`` whose cluster
    environment says rank r). After every backward pass the replicas' gradients are replaced by their
    mean, which is DDP's all-reduce; everything else (clipping, the steps, the target and EMA updates) runs
    on each replica as it does on each rank."""
    replicas, emas, streams = [], [], []
    for rank in (0, 1):
        module, dm = bank_module(model_data)
        emas.append(ActorEMA(decay=0.9, start=1, every=1))  # as in the DDP run's config
        emas[-1].setup(None, module, "fit")  # type: ignore[arg-type]
        weights = {k: v for k, v in initial.items() if not k.startswith("ema.")}
        loaded = module.load_state_dict(weights, strict=False)  # the bank is filled already
        assert loaded.missing_keys == ["task_bank._extra_state"] and not loaded.unexpected_keys
        module.ema_policy.load_state_dict({k[4:]: v for k, v in initial.items() if k.startswith("ema.")})
        env = LightningEnvironment()
        strategy = DDPStrategy(cluster_environment=env)
        module.trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, logger=False)
        env.set_global_rank(rank)
        assert module.global_rank == rank and dm.transitions is not None
        streams.append(BatchStream(dm.transitions, BATCH_SIZE, STEPS_PER_EPOCH, 0, rank, "balanced"))
        replicas.append(module)
    barrier = threading.Barrier(2, timeout=120)

    def all_reduce(rank: int, loss: Tensor) -> None:
        loss.backward()
        barrier.wait()
        if rank == 0:
            for p0, p1 in zip(replicas[0].parameters(), replicas[1].parameters(), strict=True):
                if p0.grad is not None and p1.grad is not None:
                    p0.grad.copy_((p0.grad + p1.grad) / 2)
                    p1.grad.copy_(p0.grad)
        barrier.wait()

    def train(rank: int) -> list[Batch]:
        module, batches = replicas[rank], []
        opts = (torch.optim.Adam(module.critic.parameters(), lr=1e-3, fused=True),
                torch.optim.Adam(module.policy.parameters(), lr=1e-3, fused=True))  # fmt: skip
        try:
            for i in range(updates):
                batches.append(streams[rank].sample(i))
                module.update(batches[-1], *opts, backward=lambda loss: all_reduce(rank, loss))
                emas[rank].on_train_batch_end(None, module, None, None, i)  # type: ignore[arg-type]
        except BaseException:
            barrier.abort()  # the other thread fails instead of waiting
            raise
        return batches

    with ThreadPoolExecutor(2) as pool:
        runs = [pool.submit(train, rank) for rank in (0, 1)]
        batches = [run.result() for run in runs]
    return {"state": [state_with_ema(m) for m in replicas], "batches": batches}


@pytest.mark.slow
def test_ddp_two_cpu_processes_keep_identical_weights(model_data: ModelData, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Plain ``ddp`` fails here (two backward passes on disjoint parameter sets).

    Two ranks do not equal one process on the two ranks' batches concatenated, and cannot: each rank
    draws its update's noise (diffusion steps, chain noise, the Q head of Eq. 7, the training prompt) from
    its own generator, seeded by (seed, rank, update), and normalises the Q term by the mean |Q| of its
    own batch, so the all-reduced gradient is the mean of two per-rank gradients, not the gradient of one
    loss over 2B rows. What they must equal is that mean of per-rank gradients, computed in one process
    (``_ddp_by_hand``): same initial weights, same batches, same noise, gradients averaged at each backward.
    """
    callbacks = [
        {"class_path": "llmdpd_pl.callbacks.ema.ActorEMA",
         "init_args": {"decay": 0.9, "start": 1, "every": 1}},
        {"class_path": "tests.model_fixtures.RankStateDump", "init_args": {"out_dir": str(tmp_path)}},
    ]
    config = write_config(tmp_path / "config.yaml", model_data, tmp_path, trainer={"callbacks": callbacks})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "llmdpd_pl.cli", "fit", "--config", str(config), "--trainer.accelerator",
           "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp_find_unused_parameters_true"]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Grad strides do not match" not in result.stderr  # the stacked critics' gradient layout
    rank0, rank1 = _load(tmp_path / "rank0.pt"), _load(tmp_path / "rank1.pt")
    for r in (rank0, rank1):
        assert (r["world_size"], r["updates"], r["global_step"]) == (2, 3, 6)
    # Each rank trained on its own batches, so equal weights come from the gradient all-reduce.
    assert not torch.equal(rank0["batches"][0].obs, rank1["batches"][0].obs)
    # Same all-reduced gradients, same float32 ops on both ranks: bit-identical.
    assert max_abs_diff(rank0["state"], rank1["state"]) == 0.0
    assert max_abs_diff(rank0["initial"], rank1["initial"]) == 0.0
    # The weights moved: every tensor of the actor, the critics, the target critics and the EMA actor,
    # except the diffusion schedule's buffers.
    trained = [k for k in rank0["state"] if k.split(".")[0] in ("policy", "critic", "critic_target", "ema")]
    still = [k for k in trained if torch.equal(rank0["state"][k], rank0["initial"][k])]
    assert len(still) < len(trained) and all(".diffusion." in k for k in still), still

    for flag in (rank_zero_only, utils_rank_zero_only):  # a Trainer of rank 1 sets Lightning's process-wide
        monkeypatch.setattr(flag, "rank", flag.rank)  # rank 1, which would mute later tests' loggers: restore
    by_hand = _ddp_by_hand(model_data, rank0["initial"], updates=3)
    for rank, dumped in enumerate((rank0, rank1)):
        for got, want in zip(by_hand["batches"][rank], dumped["batches"], strict=True):
            for f in dataclasses.fields(got):
                assert torch.equal(getattr(got, f.name), getattr(want, f.name)), (rank, f.name)
        # Same float32 ops; an all-reduce of two ranks sums two halves, exactly (g0 + g1) / 2 here.
        assert max_abs_diff(by_hand["state"][rank], dumped["state"]) == 0.0, rank
