"""Installed from a wheel, without the source tree: `imagenetpp demo` and the shipped configs
still work (configs, label tables and model configs travel as package data)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile

from .conftest import REPO, with_report

SOURCES = ("pyproject.toml", "README.md", "configs", "curators", "pipelines", "shards")


def test_wheel_install_runs_the_demo_and_shipped_configs(demo_world, tmp_path):
    src = tmp_path / "src"  # a copy: building must not leave build/ or egg-info in the repo
    src.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(REPO / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
        check=True, capture_output=True,
    )  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("imagenetpp-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for shipped in ("configs/demo_knn_img.yaml", "configs/la1000_img2img.yaml",
                    "curators/data/imagenet1k.tsv"):  # fmt: skip
        assert shipped in names, shipped
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True)

    elsewhere = tmp_path / "cwd"  # neither the repo nor its configs/ folder is here
    elsewhere.mkdir()
    env = {**with_report(), "PYTHONPATH": str(site), "PYTHONSAFEPATH": "1"}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "pipelines.cli", *args],
            cwd=elsewhere, env=env, capture_output=True, text=True,
        )  # fmt: skip

    where = subprocess.run(
        [sys.executable, "-c", "import configs, pipelines; print(configs.__file__, pipelines.__file__)"],
        cwd=elsewhere, env=env, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert where.count(str(site)) == 2, where  # the installed copy, not the source tree

    for config in ("configs/demo_knn_img.yaml", "configs/demo_knn_text.yaml", "demo_knn_img"):
        proc = cli("check", config, "--out", str(tmp_path / "never"))
        assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr
    proc = cli("check", "configs/la1000_img2img.yaml")  # real resources absent: a clear line
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr

    out = tmp_path / "out"
    # One look-up shift and one generated shift: the installed package's two kinds of pixels.
    args = ("--executor", "local", "--no-progress", "--set", "target_per_class=30",
            "--only", "demo_knn_img,demo_sd_txt2img")  # fmt: skip
    proc = cli("demo", "--out", str(out), *args)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("total: 300 / 300 samples, 0 classes short") == 2, proc.stdout
    assert "demo-knn-url" not in proc.stdout
    assert len(list((out / "demo-knn-img" / "shards").glob("*.tar"))) == 2  # 250 samples a shard
    assert not (tmp_path / "never").exists()
    # The report ships too: each shift's page, and the demo's side-by-side table of them.
    for shift in ("demo-knn-img", "demo-sd-txt2img"):
        assert (out / shift / "report" / "index.html").is_file()
        assert (out / shift / "report" / "class_counts.png").is_file()
    assert (out / "compare.html").is_file() and "CLIPScore" in proc.stdout
