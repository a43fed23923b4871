"""The config system: files, overrides, and an error in words for every way it can be wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lockstep import config
from lockstep.errors import ConfigError

BASE = {"data": {"train": [{"path": "x.jsonl", "format": "alpaca"}]}}


def load_raw(raw: dict, *overrides: str, tmp_path: Path) -> config.RunConfig:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(raw))
    return config.load(p, list(overrides))


def error_of(raw: dict, *overrides: str, tmp_path: Path) -> str:
    with pytest.raises(ConfigError) as e:
        load_raw(raw, *overrides, tmp_path=tmp_path)
    return str(e.value)


def test_defaults_and_overrides(tmp_path):
    cfg = load_raw(
        BASE,
        "optim.lr=1e-4",
        "train.max_steps=50",
        "data.train.0.format=messages",
        "optim.betas=[0.8, 0.95]",
        "seed=null",
        "output_dir=my run",
        tmp_path=tmp_path,
    )
    assert cfg.optim.lr == pytest.approx(1e-4)
    assert cfg.train.max_steps == 50
    assert cfg.data.train[0].format == "messages"
    assert cfg.optim.betas == (0.8, 0.95)
    assert cfg.seed is None
    assert cfg.output_dir == "my run"
    assert cfg.model.path == "builtin:tiny" and cfg.model.trust_remote_code is False


def test_override_replaces_a_whole_list(tmp_path):
    cfg = load_raw(
        BASE, "data.train=[{path: a.jsonl}, {path: b.json, format: messages}]", tmp_path=tmp_path
    )
    assert [d.path for d in cfg.data.train] == ["a.jsonl", "b.json"]


def test_json_config(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({**BASE, "optim": {"lr": 0.5}}))
    assert config.load(p, ["batch.micro_size=2"]).optim.lr == 0.5


def test_json_syntax_error_names_line(tmp_path):
    p = tmp_path / "c.json"
    p.write_text('{\n  "seed": 1,\n  "optim": {"lr": }\n}')
    with pytest.raises(ConfigError, match=r"c\.json:3: .*not valid JSON"):
        config.load(p)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("optim.lrr=1", "unknown key 'optim.lrr' (did you mean optim.lr?)"),
        ("train.lr=1", "unknown key 'train.lr' (did you mean optim.lr?)"),
        ("data.train.0.pth=a", "unknown key 'data.train.0.pth' (did you mean data.train.0.path?)"),
        ("ouptut_dir=a", "unknown key 'ouptut_dir' (did you mean output_dir?)"),
    ],
)
def test_unknown_key_suggests_the_closest(tmp_path, override, expected):
    assert expected in error_of(BASE, override, tmp_path=tmp_path)


@pytest.mark.parametrize(
    ("override", "key", "value", "allowed"),
    [
        ("optim.lr=-1", "optim.lr", "-1", "greater than 0"),
        ("optim.lr=.nan", "optim.lr", "nan", "finite number"),
        ("train.max_steps=abc", "train.max_steps", "'abc'", "valid integer"),
        ("optim.scheduler=cos", "optim.scheduler", "'cos'", "'cosine', 'linear' or 'constant'"),
        ("batch.micro_size=0", "batch.micro_size", "0", "greater than or equal to 1"),
        ("seed=true", "seed", "True", "integer or null"),
        ("model=3", "model", "3", "mapping"),
        (
            "data.train.0.format=csvx",
            "data.train.0.format",
            "'csvx'",
            "'alpaca', 'messages', 'sharegpt', 'text' or 'preference'",
        ),
    ],
)
def test_wrong_type_or_range_names_path_value_and_allowed(tmp_path, override, key, value, allowed):
    msg = error_of(BASE, override, tmp_path=tmp_path)
    assert f"{key}: got {value}" in msg
    assert allowed in msg


def test_missing_required_section(tmp_path):
    assert "data: required, but missing" in error_of({}, tmp_path=tmp_path)


def test_global_batch_not_divisible_says_how_to_fix(tmp_path):
    msg = error_of(BASE, "batch.global_size=10", "batch.micro_size=4", tmp_path=tmp_path)
    assert "batch.global_size=10 is not divisible by batch.micro_size=4" in msg
    assert "multiple of 4 (e.g. 8 or 12)" in msg
    cfg = load_raw(BASE, "batch.global_size=8", "batch.micro_size=2", tmp_path=tmp_path)
    with pytest.raises(ConfigError, match=r"micro_size=2 x 3 processes = 6.*e\.g\. 6 or 12"):
        config.check(cfg, world_size=3)


def test_bad_yaml_names_the_line(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("seed: 1\noptim:\n  lr: 0.1\n   bad: [\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:4: .*not valid YAML"):
        config.load(p)


def test_duplicate_key_is_an_error(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  lr: 0.1\n  lr: 0.2\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:3: duplicate key 'lr' \(first on line 2\)"):
        config.load(p)


def test_missing_file_and_top_level_not_mapping(tmp_path):
    with pytest.raises(ConfigError, match="config file .*nope.yaml' not found"):
        config.load(tmp_path / "nope.yaml")
    p = tmp_path / "c.yaml"
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        config.load(p)


@pytest.mark.parametrize("bad", ["novalue", "=3", "a..b=1", "data.train.9.path=x", "optim.lr=[1"])
def test_malformed_overrides(tmp_path, bad):
    with pytest.raises(ConfigError, match="override"):
        load_raw(BASE, bad, tmp_path=tmp_path)


def test_dump_roundtrip_with_hash(tmp_path):
    cfg = load_raw(BASE, "seed=3", tmp_path=tmp_path)
    h = config.dump(cfg, tmp_path / "config.yaml")
    text = (tmp_path / "config.yaml").read_text()
    assert text.startswith(f"# lockstep resolved config; config_hash: {h}\n")
    assert config.load(tmp_path / "config.yaml") == cfg
    assert config.config_hash(load_raw(BASE, "seed=4", tmp_path=tmp_path)) != h


# ---------------------------------------------------------------- property: only ConfigError

KEYS = st.sampled_from(config.known_keys() + ["x", "lr", "data.train.0.path", "1", ""])
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
TREES = st.recursive(
    SCALARS,
    lambda kids: st.one_of(
        st.lists(kids, max_size=4),
        st.dictionaries(st.one_of(KEYS, st.text(max_size=6), st.integers()), kids, max_size=5),
    ),
    max_leaves=25,
)
ROOTS = st.one_of(
    TREES,
    st.dictionaries(st.sampled_from([k for k in config.known_keys() if "." not in k]), TREES),
)
OVERRIDES = st.lists(
    st.one_of(
        st.builds(lambda k, v: f"{k}={v}", KEYS, st.text(max_size=15)),
        st.text(max_size=20),
    ),
    max_size=4,
)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(tree=ROOTS, overrides=OVERRIDES)
def test_loader_raises_only_config_error(tmp_path, tree, overrides):
    p = tmp_path / "random.yaml"
    p.write_text(yaml.safe_dump(tree, allow_unicode=True))
    try:
        config.load(p, overrides)
    except ConfigError as e:
        assert str(e)  # every error has words


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    text=st.text(
        alphabet=st.sampled_from(list("ab:-[]{}\n '\"!&*%@|>=.,#0123456789\t")), max_size=60
    )
)
def test_loader_raises_only_config_error_on_raw_text(tmp_path, text):
    p = tmp_path / "random.yaml"
    p.write_text(text)
    try:
        config.load(p)
    except ConfigError as e:
        assert str(e)


def test_qlora_with_fsdp_is_refused_before_any_work():
    raw = {
        **BASE,
        "finetune": {"method": "lora", "lora": {"quantize": "4bit"}},
        "train": {"strategy": "fsdp"},
    }
    with pytest.raises(ConfigError, match=r"QLoRA\) with train.strategy=fsdp.*strategy=ddp"):
        config.validate(raw)
    raw["train"]["strategy"] = "ddp"
    assert config.validate(raw).finetune.lora.quantize == "4bit"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("batch.global_size=2147483648", "batch.global_size: got 2147483648: expected a number less than or equal to 1048576"),
        ("finetune.lora.r=1000000000", "finetune.lora.r: got 1000000000: expected a number less than or equal to 4096"),
    ],
)  # fmt: skip
def test_runaway_sizes_are_refused_with_their_bound(tmp_path, override, expected):
    assert error_of(BASE, override, tmp_path=tmp_path) == f"invalid config: {expected}"


def test_a_nul_character_in_any_value_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"^output_dir: holds a NUL character"):
        config.validate({**BASE, "output_dir": "runs/a\x00b"})
    raw = {"data": {"train": [{"path": "x.jsonl"}, {"path": "y\x00.jsonl"}]}}
    with pytest.raises(ConfigError, match=r"^data\.train\.1\.path: holds a NUL"):
        config.validate(raw)


def test_duplicate_keys_in_a_json_config_are_refused(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"seed": 1, "data": {"train": [{"path": "x.jsonl"}]}, "seed": 2}')
    with pytest.raises(ConfigError, match=r"c\.json: key 'seed' appears twice"):
        config.load(path)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("finetune.lora.target_modules=5",
         "finetune.lora.target_modules: got 5: allowed values are 'all-linear', or expected a valid list"),
        ("launch.nproc_per_node=x", "launch.nproc_per_node: got 'x': allowed values are 'auto', or "
         "expected a valid integer"),
        ("data.padding_free=x", "data.padding_free: got 'x': allowed values are 'auto', or expected a valid boolean"),
    ],
)  # fmt: skip
def test_a_union_is_one_line_without_the_schemas_type_names(tmp_path, override, expected):
    msg = error_of(BASE, override, tmp_path=tmp_path)
    assert msg.startswith(f"invalid config: {expected}") and "\n" not in msg
    for internal in ("literal[", "list[str]", "constrained-", "function-", ".bool"):
        assert internal not in msg


def test_one_reason_for_a_failed_operation():
    from lockstep.errors import first_line, reason

    assert reason(OSError(28, "No space left on device", "/x")) == "No space left on device"
    assert reason(OSError("plain words")) == "plain words"
    assert reason(ValueError("  first line\nsecond line")) == "first line"
    assert first_line(RuntimeError("")) == "RuntimeError"
