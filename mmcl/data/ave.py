"""Paired clips read from disk: AVE and a generic manifest, decoded once with PyAV.

**AVE** (Tian et al., ECCV 2018; 28 audio-visual event classes, 4143 10-second clips).
``run.benchmark.root`` is the ``AVE_Dataset`` directory (or its parent)::

    AVE_Dataset/
      AVE/<VideoID>.mp4        video + audio track
      Annotations.txt          header, then Category&VideoID&Quality&StartTime&EndTime
      trainSet.txt valSet.txt testSet.txt   the official splits, same line format

Training uses ``trainSet`` (``valSet`` too with ``train_on_val``), testing ``testSet``; the
label is the line's Category; class ids follow ``class_order`` (default: sorted names).
CIL: groups of ``classes_per_task`` classes (7 tasks of 4 by default). DIL: AVE has no
domains, so (a choice, see README) the training and test clips are split at random into
``domains`` parts and each part gets its domain's corruption (``mmcl.data.paired.DOMAINS``).

**Manifest** (``paired_manifest``): a CSV or Parquet file with columns ``split``
(train / test), ``label`` (class name), optional ``domain``, and one column per modality
(``video``, ``audio``) holding a path (absolute, or relative to the manifest's directory;
both may name the same mp4). The options list the classes (CIL) or domains (DIL) so
that a study validates without the data.

**Decoding**: each file is decoded once with PyAV into a tensor store shared by all
trials: ``<cache>/paired_store/<hash of root and decode settings>/<clip>.pt`` holding
``video`` (uint8 [frames, 3, size, size], ``frames = fps * seconds`` sampled at fixed times,
resized on the short side and centre-cropped) and ``audio`` (float32 mono at
``sample_rate``, padded / cut to ``seconds``). Writers hold an fcntl lock on the store and
write each file atomically, so concurrent trials decode nothing twice and never read a
half-written file. Samples are converted to encoder inputs when a batch is drawn.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch.utils.data import Dataset

from mmcl.data.base import Benchmark
from mmcl.data.paired import DOMAINS, ProtocolOptions, cil_task_names, corrupt, make_tasks
from mmcl.spec import SpecError

AVE_NUM_CLASSES = 28
DECODER_VERSION = "pyav-v1"


class DecodeOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    fps: float = Field(default=1.0, gt=0)  # frames kept per second of clip
    seconds: float = Field(default=10.0, gt=0)
    frame_size: int = Field(default=224, ge=8)
    sample_rate: int = Field(default=16000, ge=1000)
    # Where the decoded store lives (default <MMCL_CACHE or ~/.cache/mmcl>/paired_store).
    store_dir: str | None = None


class AVEOptions(ProtocolOptions, DecodeOptions):
    classes_per_task: int = Field(default=4, ge=1)
    num_classes: int = Field(default=AVE_NUM_CLASSES, ge=2)
    domains: list[str] = Field(default_factory=lambda: ["clean", "white", "hum", "babble"])
    train_on_val: bool = False
    domain_seed: int = 0


class ManifestOptions(ProtocolOptions, DecodeOptions):
    manifest: str = "manifest.csv"  # relative to run.benchmark.root
    # CIL needs the class list (its order is the class order), DIL the domain order.
    classes: list[str] | None = None
    domains: list[str] | None = None


def task_names(options: dict) -> list[str]:
    opts = AVEOptions.model_validate(options)
    if opts.protocol == "cil":
        return cil_task_names(opts.num_classes, opts.classes_per_task)
    _check_domains(opts.domains)
    return list(opts.domains)


def manifest_task_names(options: dict) -> list[str]:
    opts = ManifestOptions.model_validate(options)
    if opts.protocol == "cil":
        if not opts.classes:
            raise SpecError("run.benchmark.options.classes: list the class names (the CIL class order)")
        return cil_task_names(len(opts.classes), opts.classes_per_task)
    if not opts.domains:
        raise SpecError("run.benchmark.options.domains: list the domain names (one DIL task each, in order)")
    return list(opts.domains)


def _check_domains(domains: list[str]) -> None:
    bad = [d for d in domains if d not in DOMAINS]
    if bad:
        raise SpecError(f"run.benchmark.options.domains: unknown domain(s) {bad}; AVE's DIL domains: {', '.join(DOMAINS)}")


# --------------------------------------------------------------------------- decoding


@dataclass(frozen=True)
class Clip:
    key: str  # file name in the store
    paths: dict[str, Path]  # modality -> file
    label: str
    domain: str | None = None


def decode_video(path: Path, opts: DecodeOptions) -> torch.Tensor:
    """uint8 [fps * seconds, 3, size, size]: the frame shown at each of the fixed times."""
    import av
    import numpy as np
    import torch.nn.functional as F

    n = max(1, round(opts.fps * opts.seconds))
    times = [(i + 0.5) / opts.fps for i in range(n)]
    picked: list = [None] * n
    last = None
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        j = 0
        for frame in container.decode(stream):
            t = float(frame.time or 0.0)
            while j < n and t > times[j] + 1e-6 and last is not None:
                picked[j] = last  # the frame on screen at times[j]
                j += 1
            last = frame.to_ndarray(format="rgb24")
            if j >= n:
                break
        if last is None:
            raise ValueError("no decodable video frame")
        for k in range(j, n):  # clip shorter than `seconds`: hold the last frame
            picked[k] = last
    x = torch.from_numpy(np.stack(picked)).permute(0, 3, 1, 2).float()
    s = opts.frame_size
    h, w = x.shape[-2:]
    scale = s / min(h, w)
    nh, nw = max(s, round(h * scale)), max(s, round(w * scale))
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - s) // 2, (nw - s) // 2
    return x[:, :, top : top + s, left : left + s].round().clamp(0, 255).to(torch.uint8).contiguous()


def decode_audio(path: Path, opts: DecodeOptions) -> torch.Tensor:
    """float32 mono [sample_rate * seconds] in [-1, 1] (zero-padded)."""
    import av
    import numpy as np

    chunks = []
    with av.open(str(path)) as container:
        if not container.streams.audio:
            raise ValueError("no audio stream")
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="flt", layout="mono", rate=opts.sample_rate)
        for frame in container.decode(stream):
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray().reshape(-1))
        for out in resampler.resample(None):
            chunks.append(out.to_ndarray().reshape(-1))
    n = round(opts.sample_rate * opts.seconds)
    wave = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
    out = torch.zeros(n)
    m = min(n, len(wave))
    out[:m] = torch.from_numpy(wave[:m].astype(np.float32))
    return out.clamp(-1, 1)


def store_dir(root: Path, opts: DecodeOptions) -> Path:
    settings = {
        "version": DECODER_VERSION,
        "root": str(root.resolve()),
        "fps": opts.fps,
        "seconds": opts.seconds,
        "frame_size": opts.frame_size,
        "sample_rate": opts.sample_rate,
    }
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    base = Path(opts.store_dir or os.environ.get("MMCL_CACHE", Path.home() / ".cache" / "mmcl")).expanduser()
    if not opts.store_dir:
        base = base / "paired_store"
    d = base / f"{root.name}-{h}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "settings.json").write_text(json.dumps(settings, indent=1))
    return d


def ensure_decoded(clips: list[Clip], kinds: dict[str, str], store: Path, opts: DecodeOptions, dataset: str) -> None:
    """Decode every clip not in the store yet (under the store's lock)."""
    from mmcl.progress import work_bar

    todo = [c for c in clips if not (store / f"{c.key}.pt").exists()]
    if not todo:
        return
    with open(store / ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another trial decoding: wait, then skip its clips
        try:
            # Minutes for a real AVE (4,143 clips): say so, with an ETA.
            with work_bar(len(todo), f"decoding {len(todo)} {dataset} clips into {store} (once)") as bar:
                for c in todo:
                    bar.update()
                    target = store / f"{c.key}.pt"
                    if target.exists():
                        continue
                    item = {}
                    for m, kind in kinds.items():
                        try:
                            item[m] = decode_video(c.paths[m], opts) if kind == "video" else decode_audio(c.paths[m], opts)
                        except Exception as e:  # PyAV raises its own error types
                            raise SpecError(f"{dataset} clip {c.key!r}: cannot decode the {m} of {c.paths[m]} ({e})") from None
                    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
                    torch.save(item, tmp)
                    os.replace(tmp, target)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class StoredClips(Dataset):
    """Clips read from the tensor store; corrupted (DIL) and converted per sample."""

    def __init__(self, store: Path, clips: list[Clip], labels: list[int], domains: list[int],
                 domain_names: list[str | None], kinds: dict[str, str], sample_rate: int, preprocess=None,
                 corrupt_domains: bool = False):
        self.store, self.clips, self.kinds, self.sr, self.preprocess = store, clips, kinds, sample_rate, preprocess
        # AVE's DIL domains are corruptions applied here; a manifest's domains are real.
        self.corrupt_domains = corrupt_domains
        self.labels = torch.tensor(labels, dtype=torch.long)
        self.domains = torch.tensor(domains, dtype=torch.long)
        self.domain_names = domain_names

    def __len__(self) -> int:
        return len(self.clips)

    def subset(self, idx: torch.Tensor) -> "StoredClips":
        i = idx.tolist()
        return StoredClips(self.store, [self.clips[k] for k in i], self.labels[idx].tolist(), self.domains[idx].tolist(),
                           self.domain_names, self.kinds, self.sr, self.preprocess, self.corrupt_domains)

    def __getitem__(self, i: int) -> dict:
        c = self.clips[i]
        item = torch.load(self.store / f"{c.key}.pt", weights_only=True)  # tensors only: runs no code
        vm = [m for m, k in self.kinds.items() if k == "video"]
        am = [m for m, k in self.kinds.items() if k == "audio"]
        frames = {m: item[m].float()[None] / 255.0 for m in vm}
        waves = {m: item[m][None] for m in am}
        dname = self.domain_names[int(self.domains[i])]
        if self.corrupt_domains and dname and dname != "clean":
            from mmcl.data.synthetic import hash_seed

            g = torch.Generator().manual_seed(hash_seed(int.from_bytes(c.key.encode()[:6].ljust(6, b"\0"), "little"), i))
            for m in vm:
                w0 = waves[am[0]] if am else torch.zeros(1, 1)
                frames[m], _ = corrupt(dname, frames[m], w0, self.sr, g)
            for m in am:
                f0 = frames[vm[0]] if vm else torch.zeros(1, 1, 3, 1, 1)
                _, waves[m] = corrupt(dname, f0, waves[m], self.sr, g)
        out = {}
        for m in vm:
            out[m] = self.preprocess.video(m, frames[m])[0] if self.preprocess else frames[m][0]
        for m in am:
            out[m] = self.preprocess.audio(m, waves[m])[0] if self.preprocess else waves[m][0]
        return {**out, "label": int(self.labels[i]), "domain": int(self.domains[i])}


# --------------------------------------------------------------------------- builders


def _kinds(preprocess, wanted: dict[str, str], dataset: str) -> dict[str, str]:
    if preprocess is None:
        return wanted
    missing = {m: k for m, k in wanted.items() if preprocess.kinds.get(m) != k}
    if missing:
        raise SpecError(
            f"run.backbone.encoders: {dataset} provides {wanted}; the backbone has {preprocess.kinds} "
            "(name an open_clip_vision encoder for each video modality and an ast encoder for each audio one)"
        )
    return wanted


def _check_files(clips: list[Clip], dataset: str) -> None:
    missing = [(c, m, p) for c in clips for m, p in c.paths.items() if not p.is_file()]
    if missing:
        c, m, p = missing[0]
        more = f" (and {len(missing) - 1} more missing files)" if len(missing) > 1 else ""
        raise SpecError(
            f"{dataset} clip {c.key!r}: the {m} file {p} does not exist{more}; fix: point run.benchmark.root at the "
            f"complete dataset (or correct the listing that names the file)"
        )


def _sample_rate_of(preprocess, kinds: dict[str, str], opts: DecodeOptions) -> int:
    for m, k in kinds.items():
        if k == "audio" and preprocess is not None and preprocess.sampling_rate(m) != opts.sample_rate:
            raise SpecError(
                f"run.benchmark.options.sample_rate: {opts.sample_rate} but the {m} encoder expects "
                f"{preprocess.sampling_rate(m)} Hz; set sample_rate: {preprocess.sampling_rate(m)}"
            )
    return opts.sample_rate


def _read_ave_list(path: Path) -> list[tuple[str, str]]:
    if not path.is_file():
        raise SpecError(f"run.benchmark.root: {path} does not exist (AVE layout: AVE_Dataset/{{AVE/*.mp4, Annotations.txt, trainSet.txt, valSet.txt, testSet.txt}})")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        parts = line.split("&")
        if parts[0] == "Category":
            continue  # header
        if len(parts) != 5:
            raise SpecError(f"{path}:{n}: expected Category&VideoID&Quality&StartTime&EndTime, got {line!r}")
        rows.append((parts[0], parts[1]))
    return rows


def _ave_clips(opts: "AVEOptions", root) -> tuple[Path, list[str], list[Clip], list[Clip], list[str]]:
    """AVE's listing, read from its text files only: (dataset dir, class names in order,
    train clips, test clips, domains). Nothing is decoded."""
    if root is None:
        raise SpecError("run.benchmark.root: set it to the AVE_Dataset directory")
    base = Path(root).expanduser()
    if (base / "AVE_Dataset").is_dir():
        base = base / "AVE_Dataset"
    annotations = _read_ave_list(base / "Annotations.txt")
    names = sorted({c for c, _ in annotations})
    if len(names) != opts.num_classes:
        raise SpecError(
            f"run.benchmark.options.num_classes: {opts.num_classes} but {base / 'Annotations.txt'} has {len(names)} categories"
        )
    names_order = list(opts.class_order) if opts.class_order else names

    def clips_of(files: list[str]) -> list[Clip]:
        out = []
        for f in files:
            for cat, vid in _read_ave_list(base / f):
                p = base / "AVE" / f"{vid}.mp4"
                out.append(Clip(vid, {"video": p, "audio": p}, cat))
        return out

    train = clips_of(["trainSet.txt", "valSet.txt"] if opts.train_on_val else ["trainSet.txt"])
    test = clips_of(["testSet.txt"])
    domains = opts.domains if opts.protocol == "dil" else ["clean"]
    _check_domains(domains)
    unknown = sorted({c.label for c in train + test} - set(names))
    if unknown:
        raise SpecError(f"AVE split files name categories missing from Annotations.txt: {unknown}")
    return base, names_order, train, test, domains


def check_ave_data(options: dict, root, task_names: list[str]) -> None:
    """``mmcl validate --check-data`` / the start of ``mmcl run``: the AVE lists are read
    and every clip's video file must exist (nothing is decoded)."""
    _, _, train, test, _ = _ave_clips(AVEOptions.model_validate(options), root)
    _check_files(train + test, "ave")


def build_ave(options: dict, image_size: int, seed: int, preprocess=None, root=None) -> Benchmark:
    opts = AVEOptions.model_validate(options)
    base, names_order, train, test, domains = _ave_clips(opts, root)
    kinds = _kinds(preprocess, {"video": "video", "audio": "audio"}, "ave")
    sr = _sample_rate_of(preprocess, kinds, opts)
    return _build(train, test, names_order, domains, opts, kinds, sr, base, preprocess, "ave", random_domains=True)


def _manifest_clips(options: dict, root) -> tuple[Path, list[str], list[Clip], list[Clip], list[str]]:
    """The manifest's listing: (manifest path, classes, train clips, test clips, domains).
    Nothing is decoded."""
    import pandas as pd

    opts = ManifestOptions.model_validate(options)
    manifest_task_names(options)  # classes / domains are given
    path = Path(opts.manifest).expanduser()
    if not path.is_absolute():
        if root is None:
            raise SpecError("run.benchmark.root: set it (the manifest path is relative to it) or make options.manifest absolute")
        path = Path(root).expanduser() / path
    if not path.is_file():
        raise SpecError(f"run.benchmark.options.manifest: {path} does not exist")
    df = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    required = {"split", "label"}
    modalities = [c for c in df.columns if c in ("video", "audio")]
    if not required <= set(df.columns) or len(modalities) < 2:
        raise SpecError(
            f"{path}: a paired manifest needs columns split, label, video, audio (and optionally domain); "
            f"it has {list(df.columns)}"
        )
    bad_split = sorted(set(df["split"]) - {"train", "test", "val"})
    if bad_split:
        raise SpecError(f"{path}: column split holds {bad_split}; use train, val or test")
    classes = list(opts.classes or sorted(df["label"].unique()))
    extra = sorted(set(df["label"]) - set(classes))
    if extra:
        raise SpecError(f"{path}: labels {extra} are not in run.benchmark.options.classes")
    if opts.protocol == "dil":
        if "domain" not in df.columns:
            raise SpecError(f"{path}: the dil protocol needs a 'domain' column")
        domains = list(opts.domains or [])
    else:
        domains = ["clean"]

    def clips(split: list[str]) -> list[Clip]:
        out = []
        for i, row in df[df["split"].isin(split)].iterrows():
            paths = {}
            for m in modalities:
                p = Path(str(row[m])).expanduser()
                paths[m] = p if p.is_absolute() else path.parent / p
            dom = str(row["domain"]) if opts.protocol == "dil" else None
            if dom is not None and dom not in domains:
                continue  # a domain the study does not use
            out.append(Clip(f"row{i}-{Path(str(row[modalities[0]])).stem}", paths, str(row["label"]), dom))
        return out

    return path, classes, clips(["train"]), clips(["test"]), domains


def check_manifest_data(options: dict, root, task_names: list[str]) -> None:
    """``--check-data`` for ``paired_manifest``: the manifest is read and every listed
    file must exist (nothing is decoded)."""
    _, _, train, test, _ = _manifest_clips(options, root)
    _check_files(train + test, "paired_manifest")


def build_manifest(options: dict, image_size: int, seed: int, preprocess=None, root=None) -> Benchmark:
    opts = ManifestOptions.model_validate(options)
    path, classes, train, test, domains = _manifest_clips(options, root)
    kinds = _kinds(preprocess, {"video": "video", "audio": "audio"}, "paired_manifest")
    sr = _sample_rate_of(preprocess, kinds, opts)
    return _build(train, test, classes, domains, opts, kinds, sr, path.parent, preprocess,
                  "paired_manifest", random_domains=False)


def _build(train, test, class_names, domains, opts, kinds, sr, root, preprocess, dataset, random_domains) -> Benchmark:
    _check_files(train + test, dataset)
    store = store_dir(root, opts)
    # Decode each file once even if several clips (AVE: events of one video) share it.
    unique = list({c.key: c for c in train + test}.values())
    ensure_decoded(unique, kinds, store, opts, dataset)
    splits = []
    for split, clips in ((0, train), (1, test)):
        labels = [class_names.index(c.label) for c in clips]
        if random_domains:
            g = torch.Generator().manual_seed(opts.domain_seed * 2 + split)  # type: ignore[attr-defined]
            doms = (torch.randperm(len(clips), generator=g) % len(domains)).tolist()
        else:
            doms = [domains.index(c.domain) if c.domain else 0 for c in clips]
        splits.append(StoredClips(store, clips, labels, doms, list(domains), kinds, sr, preprocess, random_domains))
    tasks = make_tasks(splits[0], splits[1], class_names, list(domains), opts, "run.benchmark.options", {"benchmark": dataset})
    return Benchmark(dataset, tasks)


__all__ = ["build_ave", "build_manifest", "check_ave_data", "check_manifest_data", "decode_audio", "decode_video"]
