import pytest
import yaml

from pipelines.config import ConfigError, load_config, parse_config

from .conftest import DEMO_CONFIG, run_cli


def demo_dict() -> dict:
    return yaml.safe_load(DEMO_CONFIG.read_text())


def test_demo_config_loads_with_defaults(demo_world):
    config = load_config(DEMO_CONFIG)
    assert config.shift == "demo-knn-img"
    assert config.curator.params.queries == "image"
    assert config.curator.params.index.endswith("/index")
    assert config.run.executor == "ray"
    assert len(config.content_hash()) == 16


def test_overrides_change_values_and_hash(demo_world):
    base = load_config(DEMO_CONFIG)
    changed = load_config(DEMO_CONFIG, ["target_per_class=7", "curator.params.k_per_query=3"])
    assert changed.target_per_class == 7 and changed.curator.params.k_per_query == 3
    assert changed.content_hash() != base.content_hash()
    # Where it runs does not change what it makes.
    moved = load_config(DEMO_CONFIG, ["run.out=/elsewhere", "run.executor=local"])
    assert moved.content_hash() == base.content_hash()
    # Nor where this machine keeps the demo world: `demo:` names are hashed as written.
    assert moved.curator.params.index.endswith("/index")
    moved.curator.params.index = "/another/cache/index"
    assert moved.content_hash() == base.content_hash()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"colour": 1}, "unknown config key 'colour'"),
        ({"select": {"near_dup": 0.9}}, "unknown config key 'select.near_dup'"),
        ({"target_per_class": "many"}, "config key 'target_per_class': expected an integer"),
        ({"target_per_class": 0}, "config key 'target_per_class': must be at least 1"),
        ({"image": {"jpeg_quality": 101}}, "config key 'image.jpeg_quality'"),
        ({"shift": "a b"}, "config key 'shift'"),
        ({"classes": {"wnids": "n01443537"}}, "config key 'classes.wnids'"),
        ({"curator": {"name": "nope"}}, "unknown curator 'nope'"),
    ],
)
def test_bad_values_name_their_key(demo_world, change, message):
    data = {**demo_dict(), **change}
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        parse_config(data)


def test_bad_curator_params_name_their_key(demo_world):
    data = demo_dict()
    data["curator"]["params"]["k_per_querry"] = 5
    with pytest.raises(ConfigError, match="unknown config key 'curator.params.k_per_querry'"):
        parse_config(data)
    data = demo_dict()
    data["curator"]["params"]["queries"] = "audio"
    with pytest.raises(ConfigError, match="curator.params.queries.*'image' or 'text'"):
        parse_config(data)


@pytest.mark.parametrize(
    "args, culprit",
    [
        (["--set", "colour=red"], "colour"),
        (["--set", "target_per_class=lots"], "target_per_class"),
        (["--set", "curator.params.index=/no/such/index"], "curator.params.index"),
        (["--set", "curator.params.exemplars=/no/such/dir"], "curator.params.exemplars"),
        (["--set", "classes.wnids=[n00000000]"], "n00000000"),
    ],
)
def test_cli_user_errors_exit_2_with_one_line(demo_world, tmp_path, args, culprit):
    proc = run_cli("curate", str(DEMO_CONFIG), "--out", str(tmp_path), *args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and culprit in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "demo-knn-img" / "manifest.json").exists()


def test_cli_missing_config_file(tmp_path):
    proc = run_cli("curate", str(tmp_path / "nope.yaml"))
    assert proc.returncode == 2 and "config file not found" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_shipped_txt2img_config_names_its_missing_metadata():
    from .conftest import REPO

    config = load_config(REPO / "configs" / "la1000_txt2img.yaml", check_resources=False)
    assert config.curator.name == "caption_search" and config.curator.params.min_text_similarity == 0.82  # fmt: skip
    with pytest.raises(ConfigError, match="curator.params.metadata"):
        load_config(REPO / "configs" / "la1000_txt2img.yaml")


def test_shipped_real_config_is_valid_apart_from_its_resources():
    from .conftest import REPO

    config = load_config(REPO / "configs" / "la1000_img2img.yaml", check_resources=False)
    assert config.target_per_class == 1300 and config.classes.first is None
    assert config.curator.params.exemplars == "data/imagenet/train"
    with pytest.raises(ConfigError, match="curator.params.index"):
        load_config(REPO / "configs" / "la1000_img2img.yaml")


@pytest.mark.parametrize(
    "args, culprit",
    [
        (["index", "/no/such/pool", "--out", "IDX", "--executor", "local"], "no pool shards (.tar) at /no/such/pool"),
        (["index", "POOL", "--out", "IDX", "--model", "ViT-Nope", "--executor", "local"], "unknown open_clip model: ViT-Nope"),
        (["index", "POOL", "--out", "IDX", "--model", "imagenetpp-tiny", "--pretrained", "/no/ckpt.pt", "--executor", "local"], "model checkpoint not found: /no/ckpt.pt"),
        (["verify", "/no/such/shift"], "no such shift folder: /no/such/shift"),
    ],
)  # fmt: skip
def test_other_commands_name_missing_resources(demo_world, tmp_path, args, culprit):
    args = [
        str(demo_world / "pool") if a == "POOL" else str(tmp_path / "idx") if a == "IDX" else a
        for a in args
    ]
    proc = run_cli(*args)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"imagenetpp: error: {culprit}"
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "name",
    ["demo_knn_img", "demo_knn_text", "demo_knn_url", "demo_caption_search", "la1000_img2img",
     "la1000_txt2img", "openverse_lemmas", "demo_sd_txt2img", "demo_sd_img2img",
     "sd1000_txt2img", "sd1000_img2img"],
)  # fmt: skip
def test_every_shipped_config_parses(demo_world, name):
    from .conftest import REPO

    config = load_config(REPO / "configs" / f"{name}.yaml", check_resources=name.startswith("demo"))
    assert config.shift == name.replace("_", "-")


def test_params_typed_as_containers_parse():
    from dataclasses import dataclass, field

    from pipelines.config import build_dataclass
    from pipelines.errors import ConfigError

    @dataclass
    class Params:
        weights: dict[str, float] = field(default_factory=dict)
        size: tuple[int, int] = (64, 64)
        steps: tuple[int, ...] = ()
        names: list[str] = field(default_factory=list)

    p = build_dataclass(Params, {"weights": {"a": 1, "b": 0.5}, "size": [32, 48], "steps": [1, 2, 3], "names": ["x"]})  # fmt: skip
    assert p == Params({"a": 1.0, "b": 0.5}, (32, 48), (1, 2, 3), ["x"])
    for bad, key in (({"size": [1]}, "size"), ({"weights": {"a": "x"}}, "weights.a"),
                     ({"steps": [1, "two"]}, "steps"), ({"weights": [1]}, "weights")):  # fmt: skip
        with pytest.raises(ConfigError, match=f"'{key}"):
            build_dataclass(Params, bad)


@pytest.mark.parametrize(
    ("config", "override", "culprit"),
    [
        ("demo_knn_img", "curator.params.k_per_query=0", "curator.params.k_per_query"),
        ("demo_sd_txt2img", "curator.params.scheduler=warp", "curator.params.scheduler"),
        ("demo_caption_search", "curator.params.min_text_similarity=3", "curator.params.min_text_similarity"),
    ],
)  # fmt: skip
def test_a_bad_value_in_a_demo_config_fails_before_the_world_is_built(tmp_path, config, override, culprit):  # fmt: skip
    """A demo world not built yet (a fresh machine): check and curate both name the bad value
    at once, and build nothing."""
    import os

    from .conftest import REPO, one_line_error

    env = {**os.environ, "IMAGENETPP_CACHE": str(tmp_path / "cache")}
    path = str(REPO / "configs" / f"{config}.yaml")
    for command in ("check", "curate"):
        proc = run_cli(command, path, "--set", override, "--out", str(tmp_path / "out"), env=env)
        one_line_error(proc, culprit)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()
