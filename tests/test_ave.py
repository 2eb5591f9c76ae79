"""AVE and manifest decoding on tiny real mp4 files written with PyAV (video + AAC audio)."""

from __future__ import annotations

import fractions
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from mmcl.data import benchmark_task_names, build_benchmark, check_benchmark_data, clear_cache
from mmcl.data.ave import DecodeOptions, decode_audio, decode_video
from mmcl.spec import BenchmarkSpec, SpecError, parse_study

from .helpers import tiny_paired_backbone

CATEGORIES = {"Bark": ((200, 30, 30), 440.0), "Cat": ((30, 200, 30), 880.0), "Flute": ((30, 30, 200), 1320.0),
              "Goat": ((200, 200, 30), 1760.0)}


def write_clip(path: Path, rgb, freq: float, seconds: float = 2.0, fps: int = 4, size: int = 32, sr: int = 16000) -> None:
    import av

    with av.open(str(path), "w") as out:
        vs = out.add_stream("mpeg4", rate=fps)
        vs.width = vs.height = size
        vs.pix_fmt = "yuv420p"
        aus = out.add_stream("aac", rate=sr)
        aus.layout = "mono"
        img = np.zeros((size, size, 3), np.uint8)
        img[:] = rgb
        for _ in range(int(seconds * fps)):
            for p in vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(p)
        for p in vs.encode():
            out.mux(p)
        t = np.arange(int(seconds * sr)) / sr
        wave = (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
        for s in range(0, len(wave), 1024):
            fr = av.AudioFrame.from_ndarray(wave[s : s + 1024][None], format="fltp", layout="mono")
            fr.sample_rate, fr.pts, fr.time_base = sr, s, fractions.Fraction(1, sr)
            for p in aus.encode(fr):
                out.mux(p)
        for p in aus.encode():
            out.mux(p)


@pytest.fixture(scope="module")
def ave_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ave") / "AVE_Dataset"
    (root / "AVE").mkdir(parents=True)
    lines = {"train": [], "test": []}
    for cat, (rgb, freq) in CATEGORIES.items():
        for i in range(3):
            vid = f"{cat.lower()}{i}"
            write_clip(root / "AVE" / f"{vid}.mp4", rgb, freq)
            lines["test" if i == 2 else "train"].append(f"{cat}&{vid}&good&0&2")
    header = "Category&VideoID&Quality&StartTime&EndTime"
    (root / "Annotations.txt").write_text("\n".join([header, *lines["train"], *lines["test"]]) + "\n")
    (root / "trainSet.txt").write_text("\n".join(lines["train"]) + "\n")
    (root / "valSet.txt").write_text("")
    (root / "testSet.txt").write_text("\n".join(lines["test"]) + "\n")
    return root


OPTS = {"num_classes": 4, "classes_per_task": 2, "fps": 2.0, "seconds": 1.0, "frame_size": 32}


def _backbone():
    from mmcl.backbones import load_backbone
    from mmcl.spec import RunSpec

    return load_backbone(RunSpec.model_validate({"backbone": tiny_paired_backbone()}).backbone)


def test_decode_keeps_colour_and_pitch(ave_root):
    o = DecodeOptions(fps=2, seconds=1.0, frame_size=16, sample_rate=16000)
    v = decode_video(ave_root / "AVE" / "cat0.mp4", o)
    a = decode_audio(ave_root / "AVE" / "cat0.mp4", o)
    assert v.shape == (2, 3, 16, 16) and v.dtype == torch.uint8
    assert abs(float(v[:, 1].float().mean()) - 200) < 12 and float(v[:, 0].float().mean()) < 50
    assert a.shape == (16000,)
    peak = float(torch.fft.rfft(a).abs().argmax()) * 16000 / len(a)
    assert abs(peak - 880) < 5


def test_ave_cil_tasks_from_the_official_lists(ave_root, tmp_path):
    clear_cache()
    bb = _backbone()
    spec = BenchmarkSpec(name="ave", root=str(ave_root.parent), options={**OPTS, "store_dir": str(tmp_path)})
    bench = build_benchmark(spec, image_size=bb.image_size, preprocess=bb.preprocess)
    assert [t.name for t in bench.tasks] == ["classes-1", "classes-2"] == benchmark_task_names(spec)
    assert bench.tasks[0].classnames == ["Bark", "Cat"] and bench.tasks[1].info["class_ids"] == [2, 3]
    assert [len(t.train) for t in bench.tasks] == [4, 4] and [len(t.test) for t in bench.tasks] == [2, 2]
    s = bench.tasks[1].test[0]
    assert s["video"].shape == (2, 3, 32, 32) and s["audio"].shape == (32, 16) and s["label"] in (2, 3)
    stored = sorted(p.name for p in next(tmp_path.iterdir()).glob("*.pt"))
    assert len(stored) == 12
    # A second build (another trial) decodes nothing: the store's files are reused as they are.
    mtimes = {p: p.stat().st_mtime_ns for p in next(tmp_path.iterdir()).glob("*.pt")}
    clear_cache()
    build_benchmark(spec, image_size=bb.image_size, preprocess=bb.preprocess)
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes


def test_ave_dil_domains_corrupt_the_clips(ave_root, tmp_path):
    spec = BenchmarkSpec(name="ave", root=str(ave_root), options={**OPTS, "protocol": "dil", "domains": ["clean", "white"],
                                                                  "store_dir": str(tmp_path)})
    bench = build_benchmark(spec)  # raw clips (no preprocess)
    assert [t.name for t in bench.tasks] == ["clean", "white"]
    assert all(t.classnames == list(CATEGORIES) for t in bench.tasks)
    clean = torch.stack([bench.tasks[0].train[i]["audio"] for i in range(len(bench.tasks[0].train))])
    noisy = torch.stack([bench.tasks[1].train[i]["audio"] for i in range(len(bench.tasks[1].train))])
    # White noise raises the energy outside the tones' frequencies.
    def hf(x):
        return torch.fft.rfft(x).abs()[:, 4000:].mean()
    assert hf(noisy) > 5 * hf(clean)


def test_concurrent_builds_share_one_store(ave_root, tmp_path):
    errors = []

    def build():
        try:
            from mmcl.data.ave import build_ave

            build_ave({**OPTS, "store_dir": str(tmp_path)}, 32, 0, root=str(ave_root))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=build) for _ in range(3)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors
    store = next(tmp_path.iterdir())
    assert len(list(store.glob("*.pt"))) == 12 and not list(store.glob(".*.tmp"))


def test_missing_file_names_the_clip_and_modality(ave_root, tmp_path):
    broken = tmp_path / "AVE_Dataset"
    (broken / "AVE").mkdir(parents=True)
    for f in ("Annotations.txt", "trainSet.txt", "valSet.txt", "testSet.txt"):
        (broken / f).write_text((ave_root / f).read_text())
    for p in (ave_root / "AVE").glob("*.mp4"):
        if p.stem != "goat1":
            (broken / "AVE" / p.name).symlink_to(p)
    with pytest.raises(SpecError, match=r"ave clip 'goat1': the video file .*goat1\.mp4 does not exist"):
        build_benchmark(BenchmarkSpec(name="ave", root=str(broken), options={**OPTS, "store_dir": str(tmp_path / "s")}))
    # `mmcl validate --check-data` (and the start of `mmcl run`) finds it too, decoding nothing.
    spec = BenchmarkSpec(name="ave", root=str(broken), options={**OPTS, "store_dir": str(tmp_path / "s2")})
    with pytest.raises(SpecError, match=r"ave clip 'goat1': the video file .*goat1\.mp4 does not exist.*fix"):
        check_benchmark_data(spec)
    assert not (tmp_path / "s2").exists()
    check_benchmark_data(BenchmarkSpec(name="ave", root=str(ave_root), options=OPTS))  # complete: passes
    with pytest.raises(SpecError, match=r"Annotations\.txt does not exist"):
        check_benchmark_data(BenchmarkSpec(name="ave", root=str(tmp_path / "nowhere"), options=OPTS))


def test_manifest_dil_and_errors(ave_root, tmp_path):
    import pandas as pd

    rows = []
    for p in sorted((ave_root / "AVE").glob("*.mp4")):
        cat = next(c for c in CATEGORIES if p.stem.startswith(c.lower()))
        i = int(p.stem[-1])
        # Train: one clip per domain and class; test: one clip per class, half in each domain.
        dom = ["studio", "street", "studio" if cat in ("Bark", "Flute") else "street"][i]
        rows.append({"split": "test" if i == 2 else "train", "video": str(p), "audio": str(p), "label": cat, "domain": dom})
    pd.DataFrame(rows).to_parquet(tmp_path / "m.parquet")
    opts = {"manifest": "m.parquet", "protocol": "dil", "domains": ["studio", "street"], "classes": list(CATEGORIES),
            "fps": 1.0, "seconds": 1.0, "frame_size": 32, "store_dir": str(tmp_path / "store")}
    spec = BenchmarkSpec(name="paired_manifest", root=str(tmp_path), options=opts)
    assert benchmark_task_names(spec) == ["studio", "street"]
    bench = build_benchmark(spec)
    assert [len(t.train) for t in bench.tasks] == [4, 4] and [len(t.test) for t in bench.tasks] == [2, 2]
    assert sorted(int(bench.tasks[1].test[i]["label"]) for i in range(2)) == [1, 3]  # Cat, Goat in the street
    assert bench.tasks[0].info["class_ids"] == [0, 1, 2, 3]
    with pytest.raises(SpecError, match=r"options.classes"):
        benchmark_task_names(BenchmarkSpec(name="paired_manifest", options={"protocol": "cil"}))
    check_benchmark_data(spec)
    pd.DataFrame([{**rows[0], "video": str(tmp_path / "gone.mp4")}, *rows[1:]]).to_parquet(tmp_path / "gone.parquet")
    with pytest.raises(SpecError, match=r"paired_manifest clip .*the video file .*gone\.mp4 does not exist"):
        check_benchmark_data(BenchmarkSpec(name="paired_manifest", root=str(tmp_path), options={**opts, "manifest": "gone.parquet"}))
    pd.DataFrame(rows).drop(columns=["audio"]).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(SpecError, match=r"needs columns split, label, video, audio"):
        build_benchmark(BenchmarkSpec(name="paired_manifest", root=str(tmp_path), options={**opts, "manifest": "bad.csv"}))


def test_ave_study_validates_without_data(tmp_path):
    study = {
        "name": "ave",
        "run": {"backbone": tiny_paired_backbone(), "benchmark": {"name": "ave", "root": "/nonexistent/AVE_Dataset"},
                "method": {"name": "cma"}},
        "stages": [{"name": "s", "kind": "search", "search_space": "cma", "num_samples": 2}],
    }
    parse_study(study)
