"""Config files: YAML aliases are refused before anything expands, and every model setting's type is checked
up front, so a wrong value is one line naming its key (exit 2), never a TypeError deep in training."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from core.yaml_files import read_yaml
from model.config import DEFAULTS, MODEL_RULES, TRAINING_RULES, load_config
from core.errors import UserError
from pipeline.cli import main
from tests.coco_fixtures import write_coco_tiles

# "Billion laughs": 324 bytes whose aliases expand to 9^9 = 387 million strings in whatever walks the result.
ALIAS_BOMB = "".join(
    [f'a: &a [{",".join(["lol"] * 9)}]\n']
    + [f"{name}: &{name} [{','.join(['*' + prev] * 9)}]\n" for prev, name in zip("abcdefgh", "bcdefghi")]
)


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def leaf_keys(tree: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        keys |= leaf_keys(value, dotted + ".") if isinstance(value, dict) else {dotted}
    return keys


def test_the_alias_bomb_is_small():
    assert len(ALIAS_BOMB.encode()) < 400 and ALIAS_BOMB.count("*") == 72


def test_aliases_are_refused_before_they_expand(tmp_path):
    bomb = write(tmp_path, ALIAS_BOMB, "bomb.yaml")
    with pytest.raises(UserError, match=r"bomb.yaml: line 1: YAML anchors and aliases .* are not accepted"):
        read_yaml(bomb)
    merge_key = write(tmp_path, "base: &base {lr: 1.0e-4}\noptimizer:\n  <<: *base\n", "merge.yaml")
    with pytest.raises(UserError, match="merge.yaml: line 1: YAML anchors and aliases"):
        read_yaml(merge_key)


@pytest.mark.parametrize("command", [
    ["train", "--data", "tiles", "--out", "m.pt", "--iters", "1"],  # model configs
    ["run", "scene.tif", "--checkpoint", "m.pt"],  # pipeline settings read through the same read_yaml
])
def test_an_alias_bomb_as_config_is_one_line(tmp_path, capsys, command):
    bomb = write(tmp_path, ALIAS_BOMB, "bomb.yaml")
    code = main([*command, "--config", str(bomb)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith(f"error: {bomb}: line 1: YAML anchors and aliases") and "\n" not in err


def test_every_model_setting_has_a_type_rule():
    assert set(MODEL_RULES) | set(TRAINING_RULES) == leaf_keys(DEFAULTS)


@pytest.mark.parametrize("text, key", [
    ("optimizer: {lr: fast}", "optimizer.lr"),
    ("model: {anchor_sizes: 3}", "model.anchor_sizes"),
    ("model: {anchor_sizes: [[32], [64], [big], [256], [512]]}", "model.anchor_sizes"),
    ("model: {aspect_ratios: [0.5, one]}", "model.aspect_ratios"),
    ("model: {fpn_channels: 256.5}", "model.fpn_channels"),
    ("model: {amp: maybe}", "model.amp"),
    ("model: {image_mean: [0.5, 0.5]}", "model.image_mean"),
    ("model: {min_size: 512, max_size: '1024'}", "model.max_size"),
    ("model: {box_detections_per_img: true}", "model.box_detections_per_img"),
    ("model: {backbone: {trainable_stages: [4]}}", "model.backbone.trainable_stages"),
    ("model: {backbone: {weights: 3}}", "model.backbone.weights"),
    ("model: {backbone: {drop_path_rate: high}}", "model.backbone.drop_path_rate"),
    ("classes: building", "classes"),
    ("train: {batch_size: two}", "train.batch_size"),
    ("train: {clip_grad_norm: [1]}", "train.clip_grad_norm"),
    ("schedule: {milestones: 0.5}", "schedule.milestones"),
    ("schedule: {gamma: null}", "schedule.gamma"),
    ("optimizer: {weight_decay: '0.05'}", "optimizer.weight_decay"),
    ("model: 3", "model"),
])
def test_a_wrong_type_names_its_key(tmp_path, text, key):
    path = write(tmp_path, text + "\n")
    with pytest.raises(UserError) as caught:
        load_config(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: '{key}' must be ") and "\n" not in message


def test_a_number_yaml_reads_as_text_gets_a_hint(tmp_path):
    path = write(tmp_path, "optimizer: {lr: 1e-4}\n")  # YAML 1.1 needs the dot: this is the string '1e-4'
    with pytest.raises(UserError, match=r"'optimizer.lr' must be a number > 0, got '1e-4' .*write 1.0e-4"):
        load_config(path)


def test_a_wrong_type_on_the_command_line_exits_2(tmp_path, capsys):
    data = tmp_path / "tiles"
    write_coco_tiles(data / "train", n_images=1)
    config = write(tmp_path, "model: {anchor_sizes: 3}\n")
    code = main(["train", "--config", str(config), "--data", str(data), "--out", str(tmp_path / "m.pt"),
                 "--iters", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == f"error: {config}: 'model.anchor_sizes' must be a list of one list of positive " \
                                "anchor sizes (pixels) per FPN map, got 3"


def test_a_section_left_empty_keeps_its_defaults(tmp_path):
    assert load_config(write(tmp_path, "model:\n  # backbone: {name: resnet50}\n")) == load_config()


@pytest.mark.parametrize("path", sorted(str(p) for p in [*Path("configs").glob("*.yaml"),
                                                           *Path("data/samples").glob("*.yaml")]
                                        if p.name != "pipeline.yaml"))
def test_the_shipped_model_configs_are_valid(path):
    load_config(path)


@pytest.mark.parametrize("text, message", [
    ('merge:\n  iou_threshold: "x"\n', "merge.iou_threshold must be a number, got 'x'"),
    ("run:\n  score_threshold: [1]\n", "run.score_threshold must be a number, got [1]"),
    ("run:\n  overwrite: 1\n", "run.overwrite must be true or false, got 1"),
    ("prepare:\n  seed: 0.5\n", "prepare.seed must be an integer, got 0.5"),
])
def test_a_pipeline_setting_of_the_wrong_type_is_named_and_exits_2(tmp_path, capsys, text, message):
    """Issue 18.6: wrong types in the pipeline YAML ended in a TypeError (exit 1) before."""
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    code = main(["run", str(tmp_path / "scene.tif"), "--config", str(config), "-o", str(tmp_path / "out.gpkg")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == f"error: {message}"


def flat_keys(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat_keys(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def test_the_shipped_pipeline_config_is_the_codes_defaults():
    """Issue 17.3: configs/pipeline.yaml documents the defaults; it must not drift from them."""
    from pipeline.settings import DEFAULTS as PIPELINE_DEFAULTS

    assert flat_keys(read_yaml("configs/pipeline.yaml")) == flat_keys(PIPELINE_DEFAULTS)


# What a backbone's config sets on purpose, apart from the shared defaults.
BACKBONE_OWN = {"swin_t": {}, "swin_s": {"model.backbone.name": "swin_s", "model.backbone.drop_path_rate": 0.3},
                "swin_b": {"model.backbone.name": "swin_b", "model.backbone.drop_path_rate": 0.3},
                "resnet50": {"model.backbone.name": "resnet50"}}


@pytest.mark.parametrize("name", sorted(BACKBONE_OWN))
def test_the_shipped_model_configs_hold_the_codes_defaults_but_their_backbone(name):
    given = flat_keys(read_yaml(f"configs/{name}.yaml"))
    defaults = flat_keys(DEFAULTS)
    differs = {key: value for key, value in given.items() if defaults.get(key, "missing") != value}
    assert differs == BACKBONE_OWN[name]


def setting_flags(command: str) -> dict[str, str]:
    """setting key -> its flag, for one command's parser."""
    from pipeline.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    flags = {action.dest: action.option_strings[0] for action in sub._actions if action.option_strings}
    return {key: flags[dest] for key, dest in sub.get_default("setting_flags")}


def test_every_pipeline_setting_has_a_flag_whose_help_shows_its_default(capsys):
    from pipeline.cli import main
    from pipeline.settings import DEFAULTS as PIPELINE_DEFAULTS

    run, prepare = setting_flags("run"), setting_flags("prepare")
    prepare_keys = {k for k in flat_keys(PIPELINE_DEFAULTS) if k.startswith("prepare.")}
    assert set(run) | set(prepare) == set(flat_keys(PIPELINE_DEFAULTS))
    assert set(prepare) >= prepare_keys and not set(run) & prepare_keys
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for key, flag in run.items():
        assert flag in text and f"setting {key})" in text
    assert "(default: 0.5; setting run.score_threshold)" in text
    assert "(default: true; setting merge.class_agnostic)" in text


def test_flags_override_the_config_file_under_their_own_setting(tmp_path):
    """Each flag lands on its own key, over the YAML file's value (prepare's --workers is prepare's)."""
    import pipeline.cli as cli

    config = tmp_path / "p.yaml"
    config.write_text("run:\n  mask_threshold: 0.3\nmerge:\n  iou_threshold: 0.4\n")
    args = cli.build_parser().parse_args([
        "run", "x.tif", "--config", str(config), "--mask-threshold", "0.7", "--no-class-agnostic",
        "--edge-margin", "3", "--scaling", "range", "--value-range", "0,4000", "--no-quicklook", "--layer", "roofs"])
    from pipeline.settings import load_settings

    s = load_settings(args.config, cli.overrides_from(args))
    assert s.run.mask_threshold == 0.7 and s.merge.iou_threshold == 0.4
    assert s.merge.class_agnostic is False and s.merge.edge_margin == 3
    assert s.scaling == "range" and s.value_range == [0.0, 4000.0]
    assert s.run.quicklook is False and s.run.layer == "roofs"
    args = cli.build_parser().parse_args(["prepare", "x.tif", "--labels", "l.gpkg", "--out", "o", "--workers", "3"])
    assert cli.overrides_from(args) == {"prepare": {"workers": 3}}


def test_settings_are_parsed_once_into_a_frozen_typed_object():
    """Issue 17.3: one path from a config file or flags to one object that nothing downstream can change."""
    import dataclasses

    from pipeline.settings import DEFAULTS as PIPELINE_DEFAULTS
    from pipeline.settings import MergeSettings, Settings, load_settings

    s = load_settings(None, {"run": {"device": "cuda"}, "merge": {"edge_margin": 3}})
    assert isinstance(s, Settings) and isinstance(s.merge, MergeSettings) and s.merge.edge_margin == 3
    assert s.run.batch_size == 8  # the GPU default, resolved once here
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.run.score_threshold = 0.1
    assert Settings().to_dict() == PIPELINE_DEFAULTS
