import pytest

from sdtune.config import RunConfig, config_from_yaml, load_config, parse_overrides, resolve_local_paths
from sdtune.errors import ConfigError
from tests.conftest import REPO_ROOT

PRESETS = sorted((REPO_ROOT / "configs").rglob("*.yaml"))


def test_defaults_round_trip_through_yaml():
    cfg = RunConfig()
    assert config_from_yaml(cfg.to_yaml()) == cfg
    assert cfg.digest() == config_from_yaml(cfg.to_yaml()).digest()


def test_overrides_parse_yaml_values_and_nest():
    assert parse_overrides(["train.rank=8", "train.target_modules=[to_q,to_v]", "name=x"]) == {
        "train": {"rank": 8, "target_modules": ["to_q", "to_v"]},
        "name": "x",
    }


def test_overrides_apply_and_change_digest():
    base = load_config(None)
    tuned = load_config(None, ["train.learning_rate=5e-5", "caption.trigger=zwx"])
    assert tuned.train.learning_rate == 5e-5 and tuned.caption.trigger == "zwx"
    assert tuned.digest() != base.digest()


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["train.rnak=8"], "train.rnak"),
        (["train.rank=0"], "train.rank"),
        (["train.lr_scheduler=linearish"], "train.lr_scheduler"),
        (["nonsense"], "not key=value"),
        # Each crashed a later stage with a traceback, or silently measured something else:
        (["preprocess.resolution=33"], "preprocess.resolution: Input should be a multiple of 8"),
        (["evaluate.prompts=[]"], "evaluate.prompts"),
        (["evaluate.seeds=[]"], "evaluate.seeds"),
        (["evaluate.seeds=[99999999999999999999]"], "evaluate.seeds.0"),
        (["evaluate.loss_seeds=[]"], "evaluate.loss_seeds"),
        (["evaluate.loss_timesteps=[]"], "evaluate.loss_timesteps"),
        (["evaluate.loss_timesteps=[5000]"], "evaluate.loss_timesteps.0: Input should be less than 1000"),
        (["evaluate.loss_timesteps=[-1]"], "evaluate.loss_timesteps.0"),
    ],
)
def test_bad_overrides_name_the_key(overrides, needle):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n- not a mapping\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_resolve_local_paths_keeps_hub_ids_and_urls(tmp_path):
    (tmp_path / "data").mkdir()
    cfg = load_config(
        None, ["model.base=org/some-model", "ingest.sources=[data, 's3://b/p', 'https://x/y.zip']"]
    )
    fixed = resolve_local_paths(cfg, tmp_path)
    assert fixed.model.base == "org/some-model"
    assert fixed.ingest.sources == [str(tmp_path / "data"), "s3://b/p", "https://x/y.zip"]


@pytest.mark.parametrize("preset", PRESETS, ids=[str(p.relative_to(REPO_ROOT)) for p in PRESETS])
def test_every_shipped_preset_loads(preset):
    load_config(preset)


def test_yaml_no_means_the_no_mode():
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    assert RunConfig.model_validate({"train": {"mixed_precision": False}}).train.mixed_precision == "no"
    assert load_config(None, ["cache.enabled=false"]).cache.enabled is False
