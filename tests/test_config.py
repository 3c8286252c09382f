"""Tests for pipelocal.config: defaults, TOML loading, overrides and their precedence, errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pipelocal.config import (
    Config,
    ConfigError,
    ModelConfig,
    OptimConfig,
    PipelineConfig,
    apply_overrides,
    config_to_dict,
    load_config,
    to_toml,
)
from pipelocal.data import DATASETS
from pipelocal.models import MODELS
from pipelocal.rules import RULES


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.toml"
    path.write_text(text)
    return path


def test_defaults_build_and_match_the_documented_values() -> None:
    cfg = Config()
    assert cfg == load_config()
    assert cfg.model.name == "mlp" and cfg.data.name == "digits" and cfg.rule.name == "predsim"
    assert cfg.optim.lr == 5e-4 and cfg.rule.beta == 0.99
    # The paper's schedule: x0.25 at 50/75/89/94% of training.
    assert cfg.schedule.milestones == (0.5, 0.75, 0.89, 0.94) and cfg.schedule.gamma == 0.25
    assert cfg.pipeline.partition == ()  # balanced automatically


def test_sections_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().optim.lr = 1.0  # type: ignore[misc]


def test_toml_file_sets_values_and_keeps_other_defaults(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        (
            '[optim]\nlr = 0.01\nname = "sgd"\n'
            '[model]\nname = "cnn"\nwidth = 2\ninput_shape = [1, 8, 8]\n'
            "[pipeline]\nstages = 2\npartition = [1, 3]\n"
        ),
    )
    cfg = load_config(path)
    assert cfg.optim == OptimConfig(name="sgd", lr=0.01)
    assert cfg.model.name == "cnn" and cfg.model.input_shape == (1, 8, 8)
    assert cfg.model.width == 2.0 and isinstance(cfg.model.width, float)  # int coerced
    assert cfg.pipeline.partition == (1, 3)  # TOML lists become tuples
    assert cfg.data == Config().data and cfg.run == Config().run


def test_overrides_beat_file_beat_defaults(tmp_path: Path) -> None:
    path = _write(tmp_path, "[optim]\nlr = 0.01\nweight_decay = 0.1\n[pipeline]\nstages = 2\n")
    cfg = load_config(path, ["optim.lr=3e-4", "pipeline.partition=[2,2]", "run.name=abc"])
    assert cfg.optim.lr == 3e-4  # override > file
    assert cfg.optim.weight_decay == 0.1  # file > default
    assert cfg.optim.momentum == 0.0  # default (the authors' train.py)
    assert cfg.pipeline.stages == 2 and cfg.pipeline.partition == (2, 2)
    assert cfg.run.name == "abc"  # a bare word is taken as a string


def test_override_values_are_parsed_as_toml() -> None:
    cfg = load_config(
        None,
        [
            "run.progress=false",
            'data.augment=["flip", "cutout"]',
            "model.dropout=0.25",
            'run.name="quoted name"',
            "model.nonlin=leaky_relu",
        ],
    )
    assert cfg.run.progress is False
    assert cfg.data.augment == ("flip", "cutout")
    assert cfg.model.dropout == 0.25
    assert cfg.run.name == "quoted name"
    assert cfg.model.nonlin == "leaky_relu"


@pytest.mark.parametrize("item", ["optim.lr", "lr=0.1", "a.b.c=1", ".lr=1"])
def test_malformed_override_says_the_accepted_form(item: str) -> None:
    with pytest.raises(ConfigError) as err:
        apply_overrides({}, [item])
    assert repr(item) in str(err.value) and "section.key=value" in str(err.value)


def test_apply_overrides_does_not_mutate_its_input() -> None:
    data = {"optim": {"lr": 0.1}}
    out = apply_overrides(data, ["optim.lr=0.2"])
    assert data == {"optim": {"lr": 0.1}} and out == {"optim": {"lr": 0.2}}


def test_unknown_section_names_it_and_lists_the_sections() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["optimizer.lr=0.1"])
    msg = str(err.value)
    assert "optimizer" in msg
    for section in ("model", "data", "rule", "optim", "schedule", "pipeline", "ray", "run"):
        assert section in msg


@pytest.mark.parametrize(
    ("text", "key", "value"),
    [
        ("[optimizer]\nlr = 0.125\n", "optimizer", "0.125"),  # a misspelt table
        ('lr = 0.125\n[model]\nname = "mlp"\n', "lr", "0.125"),
    ],  # a key above any table
    ids=["misspelt-table", "key-outside-a-table"],
)
def test_unknown_section_in_file_names_key_and_value(
    tmp_path: Path, text: str, key: str, value: str
) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, text))
    msg = str(err.value)
    assert key in msg and "sections model, data, rule" in msg
    assert value in msg, f"the value given is not in the message: {msg}"


def test_unknown_key_in_file_names_key_value_and_the_known_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, "[optim]\nlearning_rate = 0.1\n"))
    msg = str(err.value)
    assert "optim.learning_rate" in msg and "0.1" in msg
    assert "lr" in msg and "weight_decay" in msg and "momentum" in msg


@pytest.mark.parametrize(
    ("override", "key", "value", "accepted"),
    [
        ("run.epochs=1.5", "run.epochs", "1.5", "an integer"),
        ("run.epochs=true", "run.epochs", "True", "an integer"),
        ("optim.lr=fast", "optim.lr", "fast", "a finite number"),
        ("run.progress=1", "run.progress", "1", "true or false"),
        ("model.name=3", "model.name", "3", "one of cnn, mlp"),
        ("pipeline.partition=2", "pipeline.partition", "2", "a list"),
        ("pipeline.partition=[1.5]", "pipeline.partition", "1.5", "an integer"),
    ],
)
def test_wrong_type(override: str, key: str, value: str, accepted: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    msg = str(err.value)
    assert key in msg and value in msg and accepted in msg


@pytest.mark.parametrize(
    ("overrides", "key", "value", "accepted"),
    [
        (["optim.lr=-1"], "optim.lr", "-1", "> 0"),
        (["model.dropout=1.5"], "model.dropout", "1.5", "0 <= p < 1"),
        (["optim.momentum=1"], "optim.momentum", "1", "0 <= momentum < 1"),
        (["rule.beta=2"], "rule.beta", "2", "0 <= beta <= 1"),
        (["run.epochs=0"], "run.epochs", "0", ">= 1"),
        (["model.input_shape=[8, 8]"], "model.input_shape", "(8, 8)", "[C, H, W]"),
        (["schedule.milestones=[0.75, 0.5]"], "schedule.milestones", "0.75", "increasing"),
        (['data.augment=["rotate"]'], "data.augment", "rotate", "jitter, flip, padcrop"),
        (["optim.name=rmsprop"], "optim.name", "rmsprop", "adam, sgd"),
        (
            ["pipeline.stages=2", "pipeline.partition=[1, 1, 1]"],
            "pipeline.partition",
            "(1, 1, 1)",
            "one block count per stage (2 entries",
        ),
        (
            ["pipeline.stages=1", "pipeline.partition=[2, 2]"],
            "pipeline.partition",
            "(2, 2)",
            "1 entries for pipeline.stages = 1",
        ),
        (["pipeline.stages=-1"], "pipeline.stages", "-1", ">= 0"),
        (["pipeline.launcher=dask"], "pipeline.launcher", "dask", "spawn, ray"),
        (["pipeline.micro_batches=0"], "pipeline.micro_batches", "0", "an integer >= 1"),
        (["pipeline.ideal_steps=1"], "pipeline.ideal_steps", "1", "an integer >= 2"),
        (["pipeline.ideal_steps=3", "pipeline.replicas=2"], "pipeline.ideal_steps", "3",
         "pipeline.replicas > 1"),
        (["ray.gpus_per_stage=2"], "ray.gpus_per_stage", "2", "NCCL cannot share a GPU"),
        (["ray.cpus_per_stage=0"], "ray.cpus_per_stage", "0", "> 0"),
        (["ray.placement=strict"], "ray.placement", "strict", "pack, spread"),
        (
            ["pipeline.stages=2", "pipeline.partition=[0, 3]"],
            "pipeline.partition",
            "(0, 3)",
            "block counts >= 1",
        ),
    ],
)
def test_impossible_values(overrides: list[str], key: str, value: str, accepted: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    msg = str(err.value)
    assert key in msg and value in msg and accepted in msg


@pytest.mark.parametrize(
    ("section", "available"),
    [("model", MODELS.names), ("rule", RULES.names), ("data", DATASETS.names)],
)
def test_unknown_registered_name_lists_the_registry(section: str, available) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"{section}.name=no-such-thing"])
    msg = str(err.value)
    assert f"{section}.name" in msg and "no-such-thing" in msg
    names = available()
    assert names and all(name in msg for name in names)


def test_missing_or_invalid_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(_write(tmp_path, "[optim\nlr = "))


def test_section_must_be_a_table(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="a table of keys"):
        load_config(_write(tmp_path, "optim = 3\n"))


def test_replace_merges_and_validates() -> None:
    cfg = Config().replace(optim={"lr": 0.1}, model=ModelConfig(name="cnn"))
    assert cfg.optim.lr == 0.1 and cfg.optim.name == "adam" and cfg.model.name == "cnn"
    with pytest.raises(ConfigError, match=r"optim\.lr"):
        Config().replace(optim={"lr": 0.0})


def test_to_toml_round_trips(tmp_path: Path) -> None:
    cfg = load_config(
        None,
        [
            "model.name=cnn",
            "model.width=0.25",
            "model.input_shape=[3, 32, 32]",
            'data.augment=["flip", "padcrop"]',
            'data.data_dir="/tmp/some dir/ü"',
            "optim.lr=3e-5",
            "optim.name=sgd",
            "schedule.name=cosine",
            "schedule.milestones=[0.3]",
            "pipeline.stages=3",
            "pipeline.partition=[1, 2, 2]",
            "pipeline.wire_dtype=bfloat16",
            'run.name="with \\"quotes\\""',
            "run.progress=false",
            "rule.name=pred-bpf",
        ],
    )
    path = tmp_path / "config.toml"
    path.write_text(to_toml(cfg))
    back = load_config(path)
    assert back == cfg
    assert config_to_dict(back) == config_to_dict(cfg)
    assert load_config(_write(tmp_path, to_toml(Config()))) == Config()


def test_config_to_dict_writes_tuples_as_lists() -> None:
    data = config_to_dict(Config(pipeline=PipelineConfig(stages=2, partition=(1, 2))))
    assert data["pipeline"]["partition"] == [1, 2]
    assert data["schedule"]["milestones"] == [0.5, 0.75, 0.89, 0.94]
    assert set(data) == {"model", "data", "rule", "optim", "schedule", "pipeline", "ray",
                         "run"}


@pytest.mark.parametrize(("text", "name"), [("123", "123"), ("nan", "nan"), ("true", "true"),
                                            ("2026-01", "2026-01")])
def test_a_string_key_takes_the_literal_text(text: str, name: str) -> None:
    assert load_config(None, [f"run.name={text}"]).run.name == name


@pytest.mark.parametrize(
    ("override", "accepted"),
    [
        ("optim.lr=inf", "a finite number"),
        ("optim.lr=nan", "a finite number"),
        ("pipeline.timeout_s=0.001", "seconds >= 1"),
        ("run.name=../../x", "a folder name without '/' or '..'"),
        ("run.name=..", "a folder name without '/' or '..'"),
    ],
)
def test_values_that_would_break_a_run_are_rejected(override: str, accepted: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert override.split("=")[0] in str(err.value) and accepted in str(err.value)


def test_config_help_lists_every_key_with_default_and_meaning() -> None:
    from pipelocal.config import config_help

    text = config_help()
    assert "    run.allow_nonfinite = false  Keep training when a block's loss is NaN" in text
    assert '    data.name = "digits"  Registered dataset' in text
    keys = sum(len(dataclasses.fields(s.default_factory)) for s in dataclasses.fields(Config))
    assert text.count("\n    ") == keys


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "configs").glob("*.toml")),
                         ids=lambda p: p.name)
def test_every_example_config_is_valid(path: Path) -> None:
    load_config(path)


def test_a_saved_config_without_newer_keys_gets_the_values_it_trained_with() -> None:
    from pipelocal.config import upgrade_saved_config

    old = {"rule": {"name": "auglocal"}, "model": {"name": "resnet32"},
           "data": {"name": "svhn"}, "schedule": {"name": "cosine"}}
    new = upgrade_saved_config(old)
    assert new["rule"]["top_layers"] == "local" and new["rule"]["infopro_target"] == "minmax"
    assert new["model"]["init"] == "pytorch" and new["schedule"]["warmup_epochs"] == 0
    assert new["pipeline"]["micro_batches"] == 1  # the whole batch at once, as it trained
    assert new["rule"]["micro_batch_similarity"] is False
    assert new["data"] == {"name": "svhn-extra", "pad_mode": "zeros"}  # svhn was train + extra
    assert old["data"] == {"name": "svhn"}  # the input is left alone
    current = upgrade_saved_config(config_to_dict(Config()))
    assert current == config_to_dict(Config())  # a config of this version is unchanged
