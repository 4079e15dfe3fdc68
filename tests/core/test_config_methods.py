"""Typed method settings: each train.method takes its own options (flat in the YAML); an option of another
method is a one-line config error naming the options the method does take."""

from __future__ import annotations

import pytest

from sdtune.cli import main
from sdtune.config import (
    ALL_TRAIN_OPTIONS,
    METHOD_SECTIONS,
    RunConfig,
    config_from_dict,
    config_from_yaml,
    load_config,
    method_options,
)
from sdtune.errors import ConfigError
from sdtune.sweep.space import Trial, trial_config
from tests.conftest import REPO_ROOT

TINY = REPO_ROOT / "configs/debug/tiny_cpu.yaml"
LORA = {"rank", "alpha", "target_modules"}
PRIOR = {
    "with_prior_preservation",
    "prior_loss_weight",
    "num_class_images",
    "class_prompt",
    "class_data_dir",
    "class_image_steps",
    "class_image_guidance",
}
CONCEPT = {"num_vectors", "initializer_token"}
# The decision, written out: which method reads which of its own options.
EXPECTED = {
    "lora": LORA
    | PRIOR
    | {"use_dora", "export_kohya", "train_text_encoder", "text_encoder_lr", "text_encoder_target_modules"},
    "textual_inversion": CONCEPT,
    "pivotal": LORA | CONCEPT | {"export_kohya", "embedding_learning_rate", "embedding_train_fraction"},
    "dreambooth": PRIOR | {"export_single_file", "train_text_encoder", "text_encoder_lr"},
    "inpaint": LORA
    | {"use_dora", "export_kohya", "inpaint_full_unet", "inpaint_masks", "inpaint_masks_per_image"},
    "full": {"export_single_file", "use_ema", "ema_decay", "cache_shard_size"},
}


def test_each_method_takes_exactly_its_options():
    assert set(METHOD_SECTIONS) == set(EXPECTED)
    assert {m: set(method_options(m)) for m in METHOD_SECTIONS} == EXPECTED


@pytest.mark.parametrize("method", sorted(EXPECTED))
def test_an_option_of_another_method_is_refused_naming_the_valid_ones(method):
    foreign = sorted(ALL_TRAIN_OPTIONS - EXPECTED[method] - set(RunConfig().train.model_fields) - {"method"})
    assert foreign
    takes = f"{method} takes: {', '.join(method_options(method))}"
    for option in foreign:
        with pytest.raises(ConfigError) as err:
            config_from_dict({"train": {"method": method, option: None}}, origin="c.yaml")
        assert str(err.value) == f"c.yaml: train.{option} does not apply to method {method}; {takes}"
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"train.method={method}", f"train.{foreign[0]}=1"])
    message = str(err.value)
    assert "\n" not in message
    assert (
        message
        == f"override train.{foreign[0]}=1: train.{foreign[0]} does not apply to method {method}; {takes}"
    )
    for option in EXPECTED[method] - {"with_prior_preservation"}:  # each own option loads at its default
        default = METHOD_SECTIONS[method].model_fields[option].get_default(call_default_factory=True)
        assert getattr(
            RunConfig.model_validate({"train": {"method": method, option: default}}).train, option
        ) == (default)


def test_own_options_load_and_round_trip_per_method():
    for method in METHOD_SECTIONS:
        cfg = load_config(None, [f"train.method={method}"])
        assert type(cfg.train) is METHOD_SECTIONS[method]
        assert (
            set(cfg.train.model_dump())
            == set(RunConfig().train.model_fields) - set(EXPECTED["lora"]) | EXPECTED[method]
        )
        assert config_from_yaml(cfg.to_yaml()) == cfg
        assert config_from_yaml(cfg.to_param()).digest() == cfg.digest()


def test_a_misapplied_override_is_one_error_line_exit_2(capsys, sdtune_home):
    preset = REPO_ROOT / "configs/sd15/textual_inversion_1gpu.yaml"
    code = main(["run", "--local", str(preset), "train.rank=8"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines() == [
        "error: override train.rank=8: train.rank does not apply to method textual_inversion; "
        "textual_inversion takes: num_vectors, initializer_token"
    ]
    assert not (sdtune_home / "logs").exists()


def test_a_misapplied_key_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  method: full\n  rank: 8\n")
    with pytest.raises(
        ConfigError, match=rf"^{path}: train.rank does not apply to method full; full takes: "
    ):
        load_config(path)
    path.write_text("train:\n  num_vectors: 2\n")  # no method: lora
    with pytest.raises(ConfigError, match="train.num_vectors does not apply to method lora"):
        load_config(path)


def test_switching_method_by_override_drops_the_files_options_of_its_own_method():
    cfg = load_config(TINY, ["train.method=textual_inversion", "train.num_vectors=2"])
    assert cfg.train.method == "textual_inversion" and cfg.train.num_vectors == 2
    assert not hasattr(cfg.train, "rank")  # tiny_cpu.yaml's lora rank does not travel
    with pytest.raises(ConfigError, match="override train.rank=8: train.rank does not apply"):
        load_config(TINY, ["train.method=textual_inversion", "train.rank=8"])
    with pytest.raises(ConfigError, match="unknown key"):  # a misspelt key is not dropped with them
        config_from_dict({"train": {"method": "full", "rnak": 8}})


def test_unknown_method_and_misspelt_option_name_the_choices():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.method=dora"])
    assert str(err.value) == (
        "override train.method=dora: train.method: unknown method 'dora'; one of "
        + ", ".join(METHOD_SECTIONS)
    )
    with pytest.raises(ConfigError, match=r"train.method: unknown method \[1\]"):  # over a file's method
        load_config(TINY, ["train.method=[1]"])
    with pytest.raises(ConfigError, match=r"^override train=5: train: must be a mapping of train options$"):
        load_config(TINY, ["train=5"])
    with pytest.raises(ConfigError, match=r"did you mean train.num_vectors\?"):
        load_config(None, ["train.method=pivotal", "train.num_vector=2"])


def test_sweep_trials_may_switch_method_and_are_checked_per_method():
    base = load_config(TINY)
    trial = trial_config(base, Trial(0, {"train.method": "pivotal", "train.num_vectors": 3}))
    assert (
        trial.train.method == "pivotal"
        and trial.train.num_vectors == 3
        and trial.train.rank == base.train.rank
    )
    with pytest.raises(ConfigError, match="train.num_vectors does not apply to method lora"):
        trial_config(base, Trial(1, {"train.num_vectors": 3}))


def test_flow_matching_options_only_on_flow_matching_families():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.timestep_density=uniform"])
    assert str(err.value) == (
        "override train.timestep_density=uniform: train.timestep_density: applies to flow-matching families "
        "only (model.arch sd3), not to model.arch sd15 (SD 1.x)"
    )
    assert load_config(None, ["model.arch=sd3", "train.timestep_density=uniform"]).train.timestep_density == (
        "uniform"
    )


def test_option_accessor_for_code_shared_by_methods():
    full = load_config(None, ["train.method=full", "train.use_ema=true"]).train
    assert full.option("use_ema") is True and full.option("with_prior_preservation", False) is False
    with pytest.raises(AttributeError):
        full.option("use_emma")


def test_docs_list_each_methods_options():
    doc = (REPO_ROOT / "docs/methods.md").read_text(encoding="utf-8")
    for method in METHOD_SECTIONS:
        row = f"| `{method}` | " + ", ".join(f"`{name}`" for name in method_options(method)) + " |"
        assert row in doc, row


def test_a_checkpoint_written_with_every_option_still_resumes():
    """Before typed settings every method carried every option: such a checkpoint's extra train.* fields are
    not a config change; a changed field of this method still is."""
    from sdtune.errors import CheckpointError
    from sdtune.train.checkpoint import check_compatible, math_fields

    cfg = load_config(None, ["train.method=textual_inversion"])
    then = {**math_fields(cfg), "train.rank": 4, "train.use_ema": False}  # what a flat config recorded
    meta = {"config_hash": "written-before", "math_fields": then, "world_size": 1}
    check_compatible(meta, cfg, 1, "", "ckpt")
    changed = load_config(None, ["train.method=textual_inversion", "train.num_vectors=3"])
    with pytest.raises(CheckpointError, match=r"\(train.num_vectors changed\)"):
        check_compatible(meta, changed, 1, "", "ckpt")
